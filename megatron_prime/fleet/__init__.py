"""The rollout fleet: which trainer ranks drive which rollout engine, how new policy weights reach
them, and the work spread over them: PRIME's rollout with the accuracy filter (``collect``) and
generating and grading responses for evaluation and reports (``grading``)."""
