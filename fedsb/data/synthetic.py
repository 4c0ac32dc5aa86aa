"""The embedded synthetic task: topic classification generated from a seed, so runs need no download.

Short English sentences about one of eight topics (`TOPICS`), built from templates that mix
topic words with words shared by every class and, sometimes, a distractor of another topic.
`load_task("synthetic")` uses it by default; see `synthetic_dataset` for the construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from datasets import Dataset

from fedsb.data.schema import DataError, make_dataset

# Topic -> (nouns, past-tense verb phrases, adjectives). Only these words carry the label.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        ("striker", "goalkeeper", "referee", "stadium", "league", "tournament", "marathon",
         "playoff game", "penalty kick", "relay team", "tennis match", "championship",
         "locker room", "scoreboard"),
        ("coached", "defeated", "tackled", "cheered for", "scored against", "raced", "outplayed",
         "trained with"),
        ("undefeated", "athletic", "competitive", "olympic", "defensive", "sporty"),
    ),
    "science": (
        ("telescope", "molecule", "laboratory", "experiment", "hypothesis", "microscope",
         "particle", "genome", "fossil", "chemical reaction", "satellite data", "neutron star",
         "research paper", "physics lecture"),
        ("measured", "analysed", "observed", "simulated", "tested", "calibrated", "sequenced",
         "published"),
        ("experimental", "molecular", "scientific", "quantum", "genetic", "theoretical"),
    ),
    "business": (
        ("quarterly profit", "stock market", "startup", "merger", "investor", "shareholder",
         "budget", "invoice", "revenue", "bank loan", "supply chain", "balance sheet",
         "retail chain", "pension fund"),
        ("invested in", "acquired", "audited", "financed", "negotiated", "sold", "merged with",
         "valued"),
        ("profitable", "corporate", "financial", "bankrupt", "lucrative", "commercial"),
    ),
    "food": (
        ("soup", "recipe", "bakery", "omelette", "pasta", "spice blend", "chocolate cake",
         "kitchen", "sourdough bread", "curry", "salad", "dessert", "barbecue", "fresh herbs"),
        ("cooked", "baked", "tasted", "seasoned", "grilled", "served", "roasted", "simmered"),
        ("delicious", "spicy", "crispy", "savory", "homemade", "sweet"),
    ),
    "music": (
        ("guitar", "orchestra", "album", "melody", "concert", "choir", "drum kit", "symphony",
         "lyrics", "piano", "jazz band", "playlist", "chorus", "violin"),
        ("played", "composed", "recorded", "rehearsed", "sang", "tuned", "performed", "remixed"),
        ("acoustic", "melodic", "classical", "upbeat", "orchestral", "rhythmic"),
    ),
    "travel": (
        ("airport", "passport", "hotel", "beach resort", "train station", "museum", "island",
         "cruise ship", "mountain trail", "luggage", "itinerary", "old town", "ferry", "hostel"),
        ("visited", "toured", "booked", "explored", "flew to", "hiked", "sailed to",
         "photographed"),
        ("scenic", "tropical", "remote", "coastal", "overseas", "historic"),
    ),
    "health": (
        ("clinic", "patient", "nurse", "fever", "vaccine", "surgery", "hospital ward",
         "blood pressure", "prescription", "therapy", "flu symptoms", "pharmacy", "x-ray",
         "doctor"),
        ("treated", "vaccinated", "diagnosed", "examined", "prescribed", "nursed", "operated on",
         "screened"),
        ("medical", "chronic", "clinical", "healthy", "contagious", "surgical"),
    ),
    "politics": (
        ("parliament", "senator", "election", "ballot", "campaign", "minister", "policy",
         "coalition", "referendum", "governor", "city council", "tax bill", "voters", "embassy"),
        ("elected", "debated", "vetoed", "campaigned for", "voted on", "lobbied", "governed",
         "impeached"),
        ("political", "electoral", "partisan", "legislative", "democratic", "diplomatic"),
    ),
}
MAX_SYNTHETIC_CLASSES = len(TOPICS)

# Shared by every topic, so they carry no label information on their own.
_SUBJECTS = ("my neighbour", "the reporter", "a local family", "the students", "a friend of mine",
             "the new manager", "two volunteers", "the committee", "a young woman", "an old man",
             "the visitors", "everyone", "my sister", "the whole town")
_TIMES = ("on sunday", "last week", "this morning", "after lunch", "in the city",
          "before the holidays", "yesterday", "at the weekend", "in the spring", "late at night",
          "for the first time", "once again")
_OPENERS = ("apparently", "according to the news", "to everyone's surprise", "as expected",
            "surprisingly", "honestly", "in the end", "believe it or not")
# Words that sound topical but appear in every class: they make single words unreliable.
_AMBIGUOUS = ("record", "report", "results", "season", "team", "schedule", "plan", "crowd",
              "event", "announcement", "review", "star", "show", "deal", "training", "club")

# Slots: {s} subject, {t} time, {o} opener, {n}/{m} topic nouns, {v} topic verb, {a} topic
# adjective, {x} an ambiguous shared noun, {d} a noun from ANOTHER topic (a distractor).
# Every template has at least two topic slots and at most one distractor.
_TEMPLATES = (
    "{s} {v} the {a} {n} {t}",
    "{o}, {s} {v} the {n} and the {x}",
    "{s} said the {x} about the {n} was {a}",
    "{t}, {s} {v} a {a} {n} near the {d}",
    "nobody expected the {n} to be so {a}",
    "{s} wrote a {x} on the {a} {n} {t}",
    "{o}, the {a} {n} drew a big crowd {t}",
    "{s} {v} the {n} while talking about the {d}",
    "is the {n} really {a}? {s} is not so sure",
    "the {x} mentioned the {n} and the {m}",
    "{s} {v} the {n} but kept thinking about the {d}",
    "{o}, the {n} and the {m} made the {x} worth it",
    "{s} {v} the {m} {t}",
    "{t}, the {d} was forgotten once {s} {v} the {n}",
)


def synthetic_label_names(num_classes: int = 4) -> list[str]:
    """The topic names of the synthetic task with `num_classes` classes (a prefix of TOPICS)."""
    if not 2 <= num_classes <= MAX_SYNTHETIC_CLASSES:
        raise DataError(f"synthetic task: num_classes must be in 2..{MAX_SYNTHETIC_CLASSES}, "
                        f"got {num_classes}")
    return list(TOPICS)[:num_classes]


def _sentence(rng: np.random.Generator, topic: str, others: Sequence[str]) -> str:
    nouns, verbs, adjectives = TOPICS[topic]

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    template = pick(_TEMPLATES)
    noun = pick(nouns)
    second = pick([w for w in nouns if w != noun])
    # The distractor comes from one of the other topics *in this task*, so it is misleading.
    distractor = pick(TOPICS[pick(others)][0]) if others else pick(_AMBIGUOUS)
    return template.format(s=pick(_SUBJECTS), t=pick(_TIMES), o=pick(_OPENERS), n=noun, m=second,
                           v=pick(verbs), a=pick(adjectives), x=pick(_AMBIGUOUS), d=distractor)


def synthetic_dataset(num_examples: int, num_classes: int = 4, seed: int = 0, *,
                      label_noise: float = 0.0) -> Dataset:
    """A deterministic topic-classification dataset: short English sentences, balanced labels.

    Each sentence comes from one of a dozen templates filled with shared function words,
    shared subjects/times, words that appear in every class, at least two words of its own
    topic and sometimes one distractor noun of another topic. Labels are balanced to within
    one example. With `label_noise` p, a fraction p of the labels is replaced by a different
    class (so a perfect classifier scores 1 - p). Only a local generator seeded by `seed` is
    used; global random state is untouched.
    """
    if num_examples < 0:
        raise DataError(f"synthetic task: num_examples must be >= 0, got {num_examples}")
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"synthetic task: label_noise must be in [0, 1), got {label_noise}")
    names = synthetic_label_names(num_classes)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % num_classes)
    texts = [_sentence(rng, names[y], [t for t in names if t != names[y]]) for y in labels]
    if label_noise > 0:
        flip = rng.random(num_examples) < label_noise
        # Adding 1..C-1 modulo C always lands on a different class.
        shift = rng.integers(1, num_classes, size=num_examples)
        labels = np.where(flip, (labels + shift) % num_classes, labels)
    return make_dataset(texts, labels.tolist(), names)
