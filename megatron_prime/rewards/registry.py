"""Which verifier grades a row: chosen from its ``ability``, else its ``data_source``.

Verifier names are "math" (final-answer equivalence, 0/1) and "code" (test pass fraction);
``register_verifier`` adds more (e.g. a project-specific format checker).
"""

from __future__ import annotations

from typing import Callable

BUILTIN_VERIFIERS = ("math", "code")

# Eurus-2-RL-Data uses ability "math" / "code"; other sets spell them differently.
_ABILITIES: dict[str, str] = {
    "math": "math",
    "mathematics": "math",
    "code": "code",
    "coding": "code",
    "programming": "code",
}

# data_source prefixes (lower case) for rows without a usable ability. Eurus-2 math sources are
# numina_* (cn_k12, olympiads, synthetic_math, amc_aime, ...); code sources are taco, apps,
# codecontests, codeforces; the evaluation sets use their benchmark names.
_SOURCE_PREFIXES: dict[str, str] = {
    "numina": "math",
    "math": "math",
    "aime": "math",
    "amc": "math",
    "minerva": "math",
    "olympiad": "math",
    "gsm8k": "math",
    "toy_arith": "math",
    "taco": "code",
    "apps": "code",
    "codecontests": "code",
    "code_contests": "code",
    "codeforces": "code",
    "leetcode": "code",
    "livecodebench": "code",
}

# Extra verifiers: name -> fn(response, ground_truth) -> float in [0, 1]. They run in threads.
_CUSTOM: dict[str, Callable[[str, str], float]] = {}


class UnknownVerifierError(ValueError):
    pass


def known_verifiers() -> list[str]:
    return [*BUILTIN_VERIFIERS, *_CUSTOM]


def register_verifier(name: str, fn: Callable[[str, str], float]) -> None:
    if name in BUILTIN_VERIFIERS:
        raise ValueError(f"{name!r} is a built-in verifier")
    _CUSTOM[name] = fn


def custom_verifier(name: str) -> Callable[[str, str], float]:
    try:
        return _CUSTOM[name]
    except KeyError:
        raise UnknownVerifierError(f"unknown verifier {name!r}; known: {known_verifiers()}") from None


def register_data_source(prefix: str, verifier: str) -> None:
    """Route rows whose data_source starts with ``prefix`` to ``verifier``."""
    if verifier not in known_verifiers():
        raise UnknownVerifierError(f"unknown verifier {verifier!r}; known: {known_verifiers()}")
    _SOURCE_PREFIXES[prefix.lower()] = verifier


def verifier_for(data_source: str | None, ability: str | None) -> str:
    """The verifier name for a row; UnknownVerifierError says what would have been accepted."""
    if ability:
        name = _ABILITIES.get(ability.strip().lower())
        if name is None and ability in known_verifiers():
            name = ability
        if name is not None:
            return name
    source = (data_source or "").strip().lower()
    # Longest prefix first, so a specific registration beats a generic one.
    for prefix in sorted(_SOURCE_PREFIXES, key=len, reverse=True):
        if source.startswith(prefix):
            return _SOURCE_PREFIXES[prefix]
    raise UnknownVerifierError(
        f"no verifier for data_source={data_source!r}, ability={ability!r}: expected ability in "
        f"{sorted(set(_ABILITIES) | set(_CUSTOM))} or a data_source starting with one of "
        f"{sorted(_SOURCE_PREFIXES)} (add one with megatron_prime.rewards.register_data_source)"
    )
