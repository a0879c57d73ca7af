"""The consistency checks, no model run: every chat template renders with single-token markers and ends a turn
with a token generation stops at, the end-of-turn ids agree inside each model and across the merge and its
parents, and so do the config fields that change the numerics (`mergebot.pipeline.facts` reads them)."""

from mergebot.pipeline.facts import EOS_FIELDS, TEMPLATE_FIELD, ModelFacts
from mergebot.pipeline.report import Check


def consistency_checks(merge: ModelFacts, parents: list[ModelFacts], accepted: frozenset[str]) -> list[Check]:
    """The three no-model checks: every template renders with single-token markers, the end-of-turn ids agree
    inside each model and across them, and the numerics fields agree. A field in `accepted` may differ."""
    everyone = [merge, *parents]
    problems = [f"{m.name}: {p}" for m in everyone for p in m.problems if p.startswith("chat template")]
    turn = merge.facts.get("chat_template.turn_end")
    detail = f"renders; a turn ends with {turn}" if turn else "no chat template (nothing to check)"
    checks = [Check("chat template", not problems, "; ".join(problems) or detail)]
    problems = [f"{m.name}: {p}" for m in everyone for p in m.problems if not p.startswith("chat template")]
    problems += _disagreements(everyone, EOS_FIELDS, accepted)
    eos = merge.facts.get("generation_config.eos_token_id") or merge.facts.get("config.eos_token_id", "none")
    detail = f"generation stops at {eos}; same in every parent"
    checks.append(Check("end of turn", not problems, "; ".join(problems) or detail))
    keys = sorted({k for m in everyone for k in m.facts if k not in EOS_FIELDS and k != TEMPLATE_FIELD})
    problems = _disagreements(everyone, keys, accepted)
    detail = f"{len(keys)} fields agree" + (f" (accepted to differ: {', '.join(sorted(accepted))})" if accepted else "")
    checks.append(Check("config numerics", not problems, "; ".join(problems) or detail))
    return checks


def _disagreements(models: list[ModelFacts], keys: list[str] | tuple[str, ...], accepted: frozenset[str]) -> list[str]:
    """'field: merge A, parent B' for each field whose value differs between the merge (first) and a parent."""
    found = []
    for key in keys:
        if key in accepted or key.rsplit(".", 1)[-1] in accepted:
            continue
        values = {m.name: m.facts.get(key, "unset") for m in models}
        if len(set(values.values())) > 1:
            found.append(f"{key} differs: " + ", ".join(f"{name} {value}" for name, value in values.items()))
    return found
