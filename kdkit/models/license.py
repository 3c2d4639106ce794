"""The licence gate: may this teacher's outputs train another model?

One function, `license_gate`, is called by every recipe that moves a teacher's knowledge into a
student (`generate`, `cache`, `distill`, `sft`). It refuses licences whose terms forbid that use,
unless the config says `teacher.allow_restricted_license: true` together with a non-empty
`teacher.restricted_license_reason`; its decision (a plain dict) goes into the dataset manifest and
the student's model card.

What is refused, and why (the terms as we read them; not legal advice):

- Llama 2 (`llama2`): "You will not use the Llama Materials or any output or results of the Llama
  Materials to improve any other large language model (excluding Llama 2 or derivative works thereof)."
- Llama 3 (`llama3`): the same clause. Llama 3.1 and later (`llama3.1`, `llama3.2`, `llama3.3`,
  `llama4`) allow it only with conditions a toolkit cannot check: the student must be named
  "Llama …", ship Meta's licence and acceptable-use policy, and the 700M-monthly-user limit holds.
  Both are refused by default.
- Gemma (`gemma`): a model trained on Gemma's outputs "to perform similarly to Gemma, including
  distillation methods" is a Model Derivative bound by the Gemma Terms and Prohibited Use Policy.
- OpenAI and Anthropic terms (`openai`, `anthropic`, or a teacher served from their APIs): using
  outputs to develop models that compete with them is forbidden.
- Non-commercial (`cc-by-nc-*`, Mistral's `mnpl`, `*-research*`/`*-noncommercial*`) and
  no-derivatives (`cc-by-nd-*`) licences.

Everything else passes; an unknown licence passes with a warning and is recorded as unchecked.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlparse

from kdkit.errors import UserError

log = logging.getLogger(__name__)

FLAG = "teacher.allow_restricted_license"
REASON = "teacher.restricted_license_reason"
UNKNOWN = ("", "unknown", "other", "none")

# (pattern on the normalised licence id, what the terms restrict); the first match wins
RESTRICTED: list[tuple[str, str]] = [
    (r"cc-by(-sa)?-nc", "non-commercial use only (Creative Commons NC)"),
    (r"cc-by(-nc)?-nd", "no derivative works (Creative Commons ND)"),
    (r"llama-?2", "the Llama 2 licence forbids using its outputs to improve any other large language model"),
    (r"llama-?3(\.0)?$|llama-?3-(?!\d)", "the Llama 3 licence forbids using its outputs to improve any other "
                                         "large language model"),
    (r"llama-?[34]", "the Llama 3.1+ licence lets outputs train other models only if the model is named "
                     "'Llama …' and ships Meta's licence and acceptable-use policy"),
    (r"gemma", "a model distilled from Gemma is a Model Derivative bound by the Gemma Terms of Use and "
               "Prohibited Use Policy"),
    (r"openai", "OpenAI's terms forbid using outputs to develop models that compete with OpenAI"),
    (r"anthropic|claude", "Anthropic's terms forbid using outputs to train competing AI models"),
    (r"mnpl|non-?production", "Mistral AI Non-Production Licence: no production or commercial use"),
    (r"non-?commercial|research", "non-commercial / research-only licence"),
]
# API hosts whose terms apply to anything they serve (when teacher.license is not given)
API_TERMS = {"api.openai.com": "openai-terms", "api.anthropic.com": "anthropic-terms"}


def normalise(license_id: str | None) -> str:
    """'CC BY-NC 4.0' → 'cc-by-nc-4.0': lower case, spaces and underscores as dashes."""
    return re.sub(r"[\s_]+", "-", (license_id or "").strip().lower())


def restriction(license_id: str | None) -> str | None:
    """What the licence's terms restrict about training other models on its outputs (None: nothing known)."""
    lid = normalise(license_id)
    for pattern, said in RESTRICTED:
        if re.search(pattern, lid):
            return said
    return None


def license_from_url(base_url: str | None) -> str | None:
    """The terms implied by a served teacher's host (api.openai.com → openai-terms), else None."""
    host = urlparse(base_url or "").hostname or ""
    return API_TERMS.get(host)


def license_gate(license_id: str | None, *, allow: bool = False, reason: str | None = None,
                 teacher: str = "the teacher") -> dict:
    """Refuse (UserError) a restricted licence unless allowed with a reason; return the decision.

    The decision: {"license", "status": permitted | unknown | restricted-allowed, "restriction", "reason"}.
    """
    lid = (license_id or "unknown").strip() or "unknown"
    said = restriction(lid)
    if said is None:
        status = "unknown" if normalise(lid) in UNKNOWN else "permitted"
        if status == "unknown":
            log.warning("the licence of %s is unknown: set teacher.license to have it checked", teacher)
        return {"license": lid, "status": status, "restriction": None, "reason": None}
    if not allow:
        raise UserError(
            f"{teacher} is licensed under {lid!r}: {said}. Training a student on its outputs is refused. "
            f"If you have the right to do so (your own agreement, a permitted use), set "
            f"{FLAG}: true and say why in {REASON}."
        )
    if not (reason or "").strip():
        raise UserError(f"{FLAG} is true for {teacher} (licence {lid!r}) but {REASON} is empty: "
                        "say why this use is permitted (it is recorded in the manifest and model card)")
    log.warning("licence %r (%s) allowed by %s: %s", lid, said, FLAG, reason)
    return {"license": lid, "status": "restricted-allowed", "restriction": said, "reason": reason.strip()}


def gate_from_config(license_id: str | None, tc, *, teacher: str = "the teacher") -> dict:
    """`license_gate` with the flags of a TeacherConfig (allow_restricted_license, restricted_license_reason)."""
    return license_gate(license_id, allow=tc.allow_restricted_license, reason=tc.restricted_license_reason,
                        teacher=teacher)


def describe(license_id: str | None, tc) -> dict:
    """The decision `license_gate` would record, without refusing (status "restricted" where it would)."""
    try:
        return gate_from_config(license_id, tc)
    except UserError:
        return {"license": license_id, "status": "restricted", "restriction": restriction(license_id),
                "reason": None}


def license_card_lines(decision: dict | None) -> list[str]:
    """Model-card lines recording the licence decision."""
    if not decision:
        return []
    line = f"- **Teacher licence check:** `{decision['license']}`: {decision['status']}"
    if decision.get("restriction"):
        line += f" ({decision['restriction']})"
    if decision.get("reason"):
        line += f"; allowed because: {decision['reason']}"
    return [line]
