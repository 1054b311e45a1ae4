"""Generate the bundled examples: `pairs.jsonl` (OpenAI/Fireworks preference pairs) and
`prompts.jsonl` (prompts only), on the topics of the zoo corpus.

    python tools/make_examples.py     # rewrites examples/*.jsonl, byte-for-byte the same each run

Preferred answers are accurate and complete. Non-preferred answers are worse in one of several
ways (vague, factually wrong, cut off mid-sentence, padded and wrong, evasive), mixed so that the
preferred answer is NOT always the longer one. No prompt reuses a user turn of the corpus's
held-out perplexity slice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import corpus_facts as facts
from make_corpus import heldout_questions

HERE = Path(__file__).resolve().parent.parent / "examples"
SEED = 2024

# The worked example from the Fireworks DPO docs (docs.fireworks.ai/fine-tuning/dpo-fine-tuning), verbatim.
EINSTEIN = {
    "input": {"messages": [{"role": "user", "content": "What is Einstein famous for?"}], "tools": []},
    "preferred_output": [{"role": "assistant", "content":
                          "Einstein is renowned for his theory of relativity, especially the equation E=mc²."}],
    "non_preferred_output": [{"role": "assistant", "content": "He was a famous scientist."}],
}
# The docs' second worked example is about the rise of the Roman Empire; its exact wording could not be
# retrieved offline, so this is our own text on that prompt (accurate and complete vs. vague).
ROMAN_EMPIRE = {
    "input": {"messages": [
        {"role": "system", "content": "You are a knowledgeable history tutor."},
        {"role": "user", "content": "Can you explain the rise of the Roman Empire?"}]},
    "preferred_output": [{"role": "assistant", "content":
                          "The Roman Empire rose through military conquest, strategic alliances, and strong "
                          "political institutions. Rome expanded from a small city-state to dominate the "
                          "Mediterranean, and in 27 BC Augustus became the first emperor after the fall of the "
                          "Republic."}],
    "non_preferred_output": [{"role": "assistant", "content": "Rome got big because it won a lot of wars."}],
}

SYSTEMS = ["You are a helpful assistant.", "You are a patient teacher. Answer accurately.",
           "Answer briefly and correctly."]
FILLER = ["That's a great question, and many people wonder about it.",
          "There is a lot that could be said here, so let me try to explain it.",
          "Well, this is a topic that comes up quite often."]
EVASIVE = ["I'm not sure about that. You could try looking it up.", "It depends on many things, really.",
           "That is hard to say. There are many opinions about it."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def topics() -> list[dict]:
    """One entry per fact: question phrasings, a good answer, a vague answer and a wrong answer
    (the wrong one reuses a neighbouring entity's fact, so it reads fluently but is false)."""
    out = []
    sci = facts.SCIENTISTS
    for i, (name, field, _nation, _b, _d, known, extra) in enumerate(sci):
        other = sci[(i + 7) % len(sci)]
        out.append({"q": [f"What is {name} best known for?", f"Why do people remember {name}?",
                          f"In a sentence or two, what did {name} contribute to {field}?"],
                    "good": f"{name} is best known for {known}. {extra}",
                    "vague": f"{name} was a famous scientist who did important work.",
                    "wrong": f"{name} is best known for {other[5]}. {other[6]}"})
    hist = facts.HISTORY
    for i, (subject, short, longer) in enumerate(hist):
        other = hist[(i + 5) % len(hist)]
        out.append({"q": [f"Can you explain {subject}?", f"What should a student know about {subject}?",
                          f"Summarize {subject} for me."],
                    "good": f"{short} {longer}",
                    "vague": f"{_cap(subject)} was an important part of history a long time ago.",
                    "wrong": f"{other[1]} {other[2].split('. ')[0].rstrip('.')}."})
    cty = facts.COUNTRIES
    for i, (country, capital, continent, language, sight) in enumerate(cty):
        o = cty[(i + 3) % len(cty)]
        out.append({"q": [f"Which city is the capital of {country}?", f"What can you tell me about {country}?",
                          f"Name the capital of {country} and its main language."],
                    "good": f"The capital of {country} is {capital}. {_cap(country)} is in {continent}, its main "
                            f"language is {language}, and a famous sight there is {sight}.",
                    "vague": f"{_cap(country)} is a country with a capital city.",
                    "wrong": f"The capital of {country} is {o[1]}. It is in {o[2]} and people speak {o[3]}."})
    ani = facts.ANIMALS
    for i, (animal, group, habitat, diet, fact) in enumerate(ani):
        o = ani[(i + 4) % len(ani)]
        plain = animal.removeprefix("the ")
        out.append({"q": [f"What do you know about the {plain}?", f"Where is the {plain} found and what does it eat?",
                          f"Describe the diet and home of the {plain}."],
                    "good": f"{_cap(animal)} is a {group} that lives in {habitat} and eats {diet}. {fact}",
                    "vague": "It is an animal that lives somewhere and eats food.",
                    "wrong": f"{_cap(animal)} lives in {o[2]} and eats {o[3]}."})
    for i, (dish, what, how) in enumerate(facts.COOKING):
        o = facts.COOKING[(i + 5) % len(facts.COOKING)]
        plain = dish.removeprefix("an ").removeprefix("a ")
        out.append({"q": [f"Can you explain what {plain} is and how it is done?", f"What are the steps of {plain}?" if plain.endswith("ing") else f"How do I prepare {plain}?"],
                    "good": f"{_cap(plain)} is {what}. {how}",
                    "vague": "Just cook it until it looks done.",
                    "wrong": f"{_cap(plain)} is {o[1]}. {o[2]}"})
    for i, (topic, advice, why) in enumerate(facts.HEALTH):
        o = facts.HEALTH[(i + 4) % len(facts.HEALTH)]
        out.append({"q": [f"Any advice about {topic}?", f"How does {topic} affect my health?"],
                    "good": f"{advice} {why}",
                    "vague": "Everyone is different, so do what feels right.",
                    "wrong": f"{o[1]} {o[2]}"})
    for i, (thing, who, when, what) in enumerate(facts.TECHNOLOGY):
        o = facts.TECHNOLOGY[(i + 5) % len(facts.TECHNOLOGY)]
        out.append({"q": [f"Who created {thing}, and when?", f"Explain the history of {thing}."],
                    "good": f"{_cap(thing)} was developed by {who} in {when}. {what}",
                    "vague": "It was invented by someone a while ago and it is useful.",
                    "wrong": f"{_cap(thing)} was developed by {o[1]} in {o[2]}."})
    for i, (body, fact, extra) in enumerate(facts.SPACE):
        o = facts.SPACE[(i + 3) % len(facts.SPACE)]
        out.append({"q": [f"What is interesting about {body}?", f"Describe {body} in two sentences."],
                    "good": f"{fact} {extra}",
                    "vague": "It is something in space that scientists study.",
                    "wrong": f"{_cap(body)} is {o[1][len(o[0]) + 4:] if o[1].startswith(_cap(o[0]) + ' is ') else o[2]}"})
    for i, (concept, definition, example) in enumerate(facts.CONCEPTS):
        o = facts.CONCEPTS[(i + 3) % len(facts.CONCEPTS)]
        plain = concept.removeprefix("an ").removeprefix("a ")
        out.append({"q": [f"Can you explain {plain} to a child?", f"What does the word {plain} mean in science?"],
                    "good": f"{_cap(plain)} is {definition}. {example}",
                    "vague": "It is a science word that is hard to explain.",
                    "wrong": f"{_cap(plain)} is {o[1]}. {o[2]}"})
    return out


def _non_preferred(t: dict, kind: str, rng: random.Random) -> str:
    if kind == "vague":
        return t["vague"]
    if kind == "wrong":
        return t["wrong"]
    if kind == "truncated":  # cut off mid-sentence, like a generation that hit its token limit
        words = t["good"].split()
        return " ".join(words[: max(3, len(words) // 3)])
    if kind == "padded":  # longer than the good answer, but wrong
        first, last = rng.sample(FILLER, 2)
        return f"{first} {t['wrong']} {last}"
    return rng.choice(EVASIVE)


KINDS = ["vague", "wrong", "truncated", "padded", "evasive"]
WEIGHTS = [20, 30, 15, 25, 10]


def make_pairs(rng: random.Random, held: set[str]) -> list[dict]:
    rows = [EINSTEIN, ROMAN_EMPIRE]
    for t in topics():
        for q in t["q"][:2]:
            if q in held:
                continue
            bad = _non_preferred(t, rng.choices(KINDS, WEIGHTS)[0], rng)
            if bad == t["good"]:
                continue
            messages = [{"role": "user", "content": q}]
            if rng.random() < 0.2:
                messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
            rows.append({"input": {"messages": messages},
                         "preferred_output": [{"role": "assistant", "content": t["good"]}],
                         "non_preferred_output": [{"role": "assistant", "content": bad}]})
    return rows


def make_prompts(rng: random.Random, held: set[str]) -> list[dict]:
    rows = []
    for t in topics():
        for q in t["q"]:
            if q in held:
                continue
            messages = [{"role": "user", "content": q}]
            if rng.random() < 0.15:
                messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
            rows.append({"messages": messages})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_examples(out_dir: Path = HERE) -> tuple[list[dict], list[dict]]:
    held = heldout_questions()
    pairs = make_pairs(random.Random(SEED), held)
    prompts = make_prompts(random.Random(SEED + 1), held)
    _write(out_dir / "pairs.jsonl", pairs)
    _write(out_dir / "prompts.jsonl", prompts)
    return pairs, prompts


def main() -> None:
    pairs, prompts = write_examples()
    longer = sum(len(p["preferred_output"][0]["content"]) > len(p["non_preferred_output"][0]["content"])
                 for p in pairs)
    print(f"pairs.jsonl: {len(pairs)} pairs (preferred longer in {100 * longer / len(pairs):.0f}%); "
          f"prompts.jsonl: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
