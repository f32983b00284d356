"""What a person reads after a run: the benchmark table in the paper's layout (``eval``), the
trained implicit PRM reused for best-of-N (``score``) and the HTML page of a run's process rewards
(``inspect``). Reads run files and runs engines through training's rollout fleet; nothing in
``training`` imports this package."""
