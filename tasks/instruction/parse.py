"""The offline planner: one instruction sentence → RunSpec field values, deterministically.

It reads the hosted agent's documented phrasings ("Run DPO on accounts/a/datasets/d using Qwen3
32B.", "Sweep Qwen3 32B and Qwen3-30B-A3B with beta 0.1 and 0.3.", "Stop early once we reach 75%
win rate against the base.") and their everyday variants. What it reads is returned with the words
it came from; what it sees but cannot resolve (a model name no local folder matches, a hosted
evaluator id) is returned as *unresolved*, never guessed: the run asks about it.

No I/O beyond looking at whether named files and folders exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.endpoint import Endpoint
from preftune.tasks.instruction.models import Mention, find_mentions

_NUM = r"\d*\.?\d+(?:e-?\d+)?"
_MONEY = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# A number followed by a unit is another setting, never one more item of a list: "beta 0.1, 3 epochs".
_UNIT = r"(?!\d|\.\d|\s*(?:%|percent\b|epochs?\b|steps?\b|jobs?\b|prompts?\b|pairs?\b|tokens?\b|times?\b|x\b))"
_LIST = rf"{_NUM}(?:\s*(?:,|and|or|&|/)\s*(?:beta\s*)?{_NUM}{_UNIT})*"


@dataclass
class Reading:
    """What a sentence said: RunSpec `fields`, the words each came from (`said`), and what it named
    but could not resolve (`unresolved`: field → why)."""

    fields: dict[str, Any] = field(default_factory=dict)
    said: dict[str, str] = field(default_factory=dict)
    unresolved: dict[str, str] = field(default_factory=dict)
    generate_pairs: bool = False
    sweep_catalogue: bool = False

    def put(self, name: str, value: Any, words: str) -> None:
        self.fields[name] = value
        self.said[name] = words.strip()


def _search(pattern: str, text: str) -> re.Match | None:
    return re.search(pattern, text, re.IGNORECASE)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(_NUM, text)]


# -- files: datasets and evaluators ------------------------------------------------------------
_JSONL = re.compile(r"(?<![\w/.~-])[\w./~-]+\.jsonl\b")
_HOSTED = re.compile(r"\baccounts/[\w.-]+/(datasets|evaluators)/[\w.-]*[\w-]")
_EVAL_ID = re.compile(r"(?<![\w/.])(?:[\w./-]+\.py|[A-Za-z_][\w.]*):[A-Za-z_]\w*\b")
_TEST_CUE = re.compile(r"(test|held[- ]?out|eval\w*)\s+(?:set|split|data(?:set)?|file)?\s*(?:is|=|:|on|from|in)?\s*$",
                       re.IGNORECASE)


def find_dataset(name: str, dirs: list[Path]) -> str | None:
    """A hosted id `accounts/A/datasets/N` or a bare name → the local JSONL it stands for, if exactly
    one of: the path itself, `<path>.jsonl`, `<dir>/N.jsonl` exists."""
    candidates = [Path(name), Path(f"{name}.jsonl")]
    stem = Path(name).name
    candidates += [d / f"{stem}.jsonl" for d in dirs] + [d / stem for d in dirs]
    for c in candidates:
        if c.is_file():
            return str(c)
    return None


def _files(text: str, r: Reading, dataset_dirs: list[Path]) -> list[tuple[int, int]]:
    """Datasets, test sets and evaluators; returns the spans they took."""
    taken = []
    for m in sorted([*_JSONL.finditer(text), *_HOSTED.finditer(text)], key=lambda m: m.start()):
        if any(m.start() < e and m.end() > s for s, e in taken):
            continue
        taken.append((m.start(), m.end()))
        raw = m.group(0)
        if "/evaluators/" in raw:
            r.said["evaluator"] = raw
            r.unresolved["evaluator"] = (f"the instruction names the evaluator {raw!r}, a hosted evaluator id; "
                                         "preftune needs a Python evaluator (package.module:function or "
                                         "file.py:function) or a judge endpoint")
            continue
        test = (_TEST_CUE.search(text[max(0, m.start() - 30):m.start()])
                or _search(r"^\s*(?:as|for)\s+(?:the\s+|a\s+)?(?:test|held[- ]?out|eval)", text[m.end():m.end() + 30]))
        target = "test_dataset" if test else "dataset"
        if target in r.fields or target in r.unresolved:
            continue
        path = find_dataset(raw, dataset_dirs)
        if path is None:
            r.said[target] = raw
            r.unresolved[target] = f"the instruction names {raw!r}, which is not a file here"
        else:
            r.put(target, path, raw)
    for m in _EVAL_ID.finditer(text):
        if any(m.start() < e and m.end() > s for s, e in taken) or "@" in text[max(0, m.start() - 1):m.start()]:
            continue
        if _search(r"evaluat|scor|grad", text[max(0, m.start() - 40):m.start()]):
            taken.append((m.start(), m.end()))
            r.unresolved.pop("evaluator", None)
            r.put("evaluator", m.group(0), m.group(0))
    return taken


# -- models and endpoints ----------------------------------------------------------------------
_ENDPOINT = re.compile(r"[^\s,;]+@https?://[^\s,;]+")
_ROLE_BEFORE = re.compile(r"(strong|weak|judge|preferred|non[- ]preferred|rejected|chosen|base)\b[\w\s:=-]{0,24}$",
                          re.IGNORECASE)
_ROLE_AFTER = re.compile(r"^[\s,]*(?:\)\s*)?as\s+(?:the\s+)?(strong|weak|judge|base)\b", re.IGNORECASE)
_ROLES = {"preferred": "strong", "chosen": "strong", "non-preferred": "weak", "non preferred": "weak",
          "rejected": "weak"}


def _role(text: str, start: int, end: int) -> str:
    after = _ROLE_AFTER.search(text[end:end + 30])
    if after:
        return after.group(1).lower()
    before = text[max(0, start - 40):start]
    before = re.split(r"[.;]|\band\b(?=\s+(?:a|the)\s)", before)[-1]
    m = _ROLE_BEFORE.search(before)
    word = m.group(1).lower() if m else "base"
    return _ROLES.get(word, word)


def _endpoint(m: Mention | re.Match, api_key_env: str | None) -> Endpoint | None:
    if isinstance(m, Mention):
        return Endpoint(model=m.model) if m.model else None
    return Endpoint.parse(m.group(0).rstrip("."), api_key_env=api_key_env)


def _models(text: str, r: Reading, known: list[str], taken: list[tuple[int, int]]) -> None:
    endpoints = [(m.start(), m.end(), m) for m in _ENDPOINT.finditer(text)]
    taken = taken + [(s, e) for s, e, _ in endpoints]
    mentions = [(m.start, m.end, m) for m in find_mentions(text, known, taken)]
    bases: list[str] = []
    unknown_bases: list[str] = []
    for start, end, m in sorted(endpoints + mentions, key=lambda x: x[0]):
        role = _role(text, start, end)
        words = m.group(0) if isinstance(m, re.Match) else m.text
        if role == "base":
            if isinstance(m, Mention) and m.model:
                bases.append(m.model)
            elif isinstance(m, Mention):
                unknown_bases.append(m.text)
            else:  # a remote endpoint cannot be a base model: it is trained here
                unknown_bases.append(words)
            continue
        key_env = _key_env(text, end)
        ep = _endpoint(m, key_env)
        if ep is None:
            r.said[role] = words
            r.unresolved[role] = f"the instruction names {words!r} as the {role} model, which matches no local folder"
        elif role not in r.fields:
            r.put(role, ep, words)
    if bases or unknown_bases:
        r.said["base_models"] = ", ".join(dict.fromkeys([*(_text_for(text, b, mentions) for b in bases),
                                                         *unknown_bases]))
        r.fields["base_models"] = list(dict.fromkeys(bases))
    if unknown_bases:
        r.unresolved["base_models"] = ("the instruction names " + ", ".join(repr(u) for u in unknown_bases)
                                       + ", which match no model in the catalogue or the local model folders")


def _text_for(text: str, model: str, mentions: list) -> str:
    for _, _, m in mentions:
        if m.model == model:
            return m.text
    return model


def _key_env(text: str, end: int) -> str | None:
    m = _search(r"^\W{0,3}\(?\s*(?:key|api key)\s+(?:in|from)\s+\$?([A-Z_][A-Z0-9_]*)", text[end:end + 40])
    return m.group(1) if m else None


# -- settings ----------------------------------------------------------------------------------
_FAMILIES = {"dpo": "dpo", "sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "slic": "hinge", "simpo": "simpo",
             "orpo": "orpo"}
_LNORM = r"length[- ]?normali[sz]\w*|normali[sz]e\w*\s+by\s+(?:the\s+)?length|(?:per|by)[- ]token\s+average"
_REFFREE = r"reference[- ]free|without\s+(?:a|the)\s+reference(?:\s+model)?|no\s+reference\s+model"


def _losses(text: str, r: Reading) -> None:
    names = [m.group(1).lower() for m in re.finditer(r"\b(dpo|ipo|hinge|slic|simpo|orpo|sigmoid)\b", text, re.I)]
    families = list(dict.fromkeys(_FAMILIES[n] for n in names))
    rpo = _search(r"\brpo\b(?:\s*(?:with\s+)?(?:alpha|α|weight)?\s*(?:=|of|:)?\s*(" + _NUM + r"))?", text)
    lnorm, reffree = _search(_LNORM, text), _search(_REFFREE, text)
    if not (families or rpo or lnorm or reffree):
        return
    if not families or ((rpo or lnorm or reffree) and not {"dpo", "ipo", "hinge"} & set(families)):
        families.insert(0, "dpo")
    gamma = _search(r"(?:simpo\s+)?(?:gamma|γ|margin)\s*(?:=|of|:)?\s*(" + _NUM + ")", text)
    lam = _search(r"(?:orpo\s+)?(?:lambda|λ)\s*(?:=|of|:)?\s*(" + _NUM + ")", text)
    losses = []
    for fam in families:
        opts: dict[str, Any] = {"loss_type": fam}
        if fam in ("dpo", "ipo", "hinge"):
            if lnorm:
                opts["normalize_by_length"] = True
            if reffree:
                opts["reference_free"] = True
        if fam == "dpo" and rpo:
            opts["rpo_alpha"] = float(rpo.group(1)) if rpo.group(1) else 1.0
        if fam == "simpo" and gamma:
            opts["simpo_gamma"] = float(gamma.group(1))
        if fam == "orpo" and lam:
            opts["orpo_lambda"] = float(lam.group(1))
        losses.append(opts)
    words = [*names, *(m.group(0) for m in (rpo, lnorm, reffree, gamma, lam) if m)]
    r.put("losses", losses, ", ".join(dict.fromkeys(words)))


def _betas(text: str, r: Reading) -> None:
    m = _search(rf"(?:\bbetas?\b|β)\s*(?:values?\s*)?(?:=|:|of|at|in|to|over|values?)?\s*\(?\[?\s*({_LIST})", text)
    if m:
        r.put("betas", list(dict.fromkeys(_numbers(m.group(1)))), m.group(0))


def _lora(text: str, r: Reading) -> None:
    full = _search(r"\bfull(?:[- ](?:parameter|param|weights?|model))?[- ]?(?:fine[- ]?tun\w*|finetun\w*|training|ft)\b"
                   r"|\b(?:no|without)\s+lora\b", text)
    if full:
        r.put("full", True, full.group(0))
        return
    rank = (_search(r"\blora\b[^.;]{0,20}?\b(?:rank|r)\s*(?:=|of|:)?\s*(\d+)", text)
            or _search(r"\b(?:rank|r)[- ]?(?:=\s*)?(\d+)\s+lora\b", text))
    if rank:
        r.put("lora_r", int(rank.group(1)), rank.group(0))
    alpha = _search(r"\blora\b[^.;]{0,30}?\balpha\s*(?:=|of|:)?\s*(\d+)", text)
    if alpha:
        r.put("lora_alpha", int(alpha.group(1)), alpha.group(0))
    if (rank or alpha or _search(r"\bwith\s+lora\b|\blora\s+(?:adapters?|fine[- ]?tun\w*)", text)):
        r.fields.setdefault("full", False)
        r.said.setdefault("full", "LoRA")


def _target(text: str, r: Reading) -> None:
    if _search(r"\bno\s+early[- ]stop\w*|\bdon'?t\s+stop\s+early|\bdo\s+not\s+stop\s+early|\b(?:whole|full|entire)\s+"
               r"(?:grid|sweep)\b", text):
        r.put("target_win_rate", None, "no early stop")
        return
    m = (_search(rf"({_NUM})\s*(%|percent)?\s*(?:win[- ]?rate)", text)
         or _search(rf"win[- ]?rate\s*(?:target\s*)?(?:is\s+|gets\s+|goes\s+|climbs\s+|rises\s+)?(?:of|≥|>=|>|=|:|above|over|"
                    rf"beyond|past|at\s+least|reach(?:es|ing)?|hit(?:s|ting)?|pass(?:es|ing)?|exceed(?:s|ing)?|"
                    rf"cross(?:es|ing)?|tops?|beats?|to)?\s*"
                    rf"(?:at\s+least\s+)?({_NUM})\s*(%|percent)?", text))
    if m:
        value = float(m.group(1))
        r.put("target_win_rate", value / 100 if m.group(2) or value > 1 else value, m.group(0))


def _budget(text: str, r: Reading) -> None:
    cue = r"(?:under|below|less\s+than|at\s+most|no\s+more\s+than|max(?:imum)?|budget|up\s+to|cap|within|limit)"
    amounts = []
    for m in re.finditer(rf"\$\s*({_MONEY})|({_MONEY})\s*(?:usd|dollars)\b", text, re.I):
        before, after = text[max(0, m.start() - 30):m.start()], text[m.end():m.end() + 12]
        if re.search(cue + r"[\w\s:=]*$", before, re.I) or re.search(r"^\s*(?:budget|max|cap|limit)", after, re.I):
            amounts.append((float((m.group(1) or m.group(2)).replace(",", "")), m.group(0)))
    if amounts:
        value, words = min(amounts)
        r.put("budget_usd", value, words)


def _switches(text: str, r: Reading) -> None:
    no_deploy = _search(r"\b(?:no|don'?t|do\s+not|without|skip(?:ping)?|never)\s+(?:deploy\w*|serv(?:e|ing))\b", text)
    if no_deploy:
        r.put("deploy", False, no_deploy.group(0))
    elif m := _search(r"\bdeploy\s+(?:the\s+)?(?:best|winner|winning|it|result)", text):
        r.put("deploy", True, m.group(0))
    gen = _search(r"\bgenerat\w*\s+(?:the\s+)?(?:preference\s+)?(?:pairs|comparisons)\b|\bdelta\s+learning\b"
                  r"|\bsynthesi[sz]e\s+(?:preference\s+)?pairs\b", text)
    if gen:
        r.generate_pairs = True
        r.said["pairs"] = gen.group(0)
    sweep = _search(r"\bsweep\s+(?:the\s+|over\s+|across\s+)?(?:base\s+models|models|catalogue|catalog)\b"
                    r"|\bfind\s+the\s+best\s+(?:base\s+)?(?:model|one)\b", text)
    if sweep:
        r.sweep_catalogue = True
        r.said.setdefault("base_models", sweep.group(0))


_INTS = {
    "epochs": (r"\b(\d+)\s+epochs?\b|\bepochs?\s*(?:=|:|of)?\s*(\d+)", 1),
    "max_concurrent_jobs": (r"\b(\d+)\s+(?:jobs?\s+)?(?:at\s+(?:a\s+time|once)|in\s+parallel|concurrent\w*)"
                            r"|\bat\s+most\s+(\d+)\s+(?:concurrent|parallel)?\s*jobs\b", 1),
    "max_eval_prompts": (r"\bevaluat\w*\s+on\s+(\d+)\s+(?:held[- ]out\s+)?prompts", 1),
    "max_pair_prompts": (r"\b(?:pairs?\s+(?:for|from)\s+)(?:at\s+most\s+|up\s+to\s+)?(\d+)\s+prompts", 1),
    "max_length": (r"\bmax(?:imum)?[- ]?(?:sequence\s+)?length\s*(?:of|=|:)?\s*(\d+)", 1),
    "seed": (r"\bseed\s*(?:=|:|of)?\s*(\d+)", 1),
    "batch_size": (r"\bbatch(?:[- ]size)?\s*(?:of|=|:)?\s*(\d+)", 1),
}


def _numbers_fields(text: str, r: Reading) -> None:
    for name, (pattern, _) in _INTS.items():
        m = _search(pattern, text)
        if m:
            r.put(name, int(next(g for g in m.groups() if g)), m.group(0))
    lr = _search(rf"\b(?:learning[- ]rate|lr)\s*(?:of|=|:)?\s*({_NUM})", text)
    if lr:
        r.put("lr", float(lr.group(1)), lr.group(0))
    rubric = _search(r"\brubric\s*[:=]?\s*[\"“']([^\"”']+)[\"”']", text)
    if rubric:
        r.put("rubric", rubric.group(1), rubric.group(0))


def parse_instruction(text: str, *, known_models: list[str], dataset_dirs: list[str | Path] = (".",)) -> Reading:
    """The fields one sentence gives, matched against `known_models` (catalogue + local folders)."""
    r = Reading()
    dirs = [Path(d) for d in dataset_dirs]
    taken = _files(text, r, dirs)
    # Numbers and settings read from the sentence with the file paths blanked out (a dataset named
    # `dpo-prefs.jsonl` is not a loss).
    plain = list(text)
    for s, e in taken:
        plain[s:e] = " " * (e - s)
    rest = "".join(plain)
    _models(rest, r, known_models, taken)
    for read in (_losses, _betas, _lora, _target, _budget, _switches, _numbers_fields):
        read(rest, r)
    if r.sweep_catalogue and not r.fields.get("base_models"):
        r.fields.pop("base_models", None)
    return r
