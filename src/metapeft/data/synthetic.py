"""Deterministic synthetic few-shot text-classification task families (no network needed).

All families draw from one fixed hand-written "world": ~24 topics, each owning a disjoint set of
keywords, plus shared filler words and sentence openers. Because the keyword -> topic mapping is
global, tasks share structure (so a meta-learned adapter init can help), while tasks vary in
family, number of classes, shots, sentence length and noise (so the choice of PEFT method matters).

Families:
- ``topic``: classify a short sentence by its topic (24 labels).
- ``topic_long``: the same, but long sentences where the keywords are diluted by filler.
- ``sentiment``: positive / negative / neutral, with negation ("not great" is negative) and topic
  keywords as distractor content.
- ``urgency``: critical / urgent / normal / low_priority, cue words over topic content.
- ``intent``: question / request / complaint / thanks / greeting / cancellation / report / offer.

Noise: with probability ``noise`` every keyword is swapped for a keyword of a different topic
(or cue set), and in the support set with probability ``noise / 2`` an example's text is drawn
from another class while keeping its label (label noise that preserves the per-class shot count).
Everything is driven by ``random.Random(seed)``; no global random state is touched.
"""

from __future__ import annotations

import random

from metapeft.data.tasks import Example, Task
from metapeft.errors import UserError

# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------

TOPICS: dict[str, tuple[str, ...]] = {
    "weather": ("rain", "sunny", "cloudy", "storm", "thunder", "forecast", "humid", "breeze",
                "drizzle", "snowfall", "temperature", "umbrella"),
    "music": ("guitar", "melody", "concert", "piano", "drums", "chorus", "album", "lyrics",
              "violin", "rhythm", "singer", "orchestra"),
    "sports": ("football", "goal", "referee", "stadium", "tennis", "match", "coach", "tournament",
               "basketball", "score", "athlete", "league"),
    "cooking": ("recipe", "oven", "garlic", "simmer", "bake", "flour", "skillet", "spices",
                "dough", "roast", "onion", "sauce"),
    "travel": ("passport", "luggage", "hotel", "flight", "itinerary", "tourist", "airport",
               "suitcase", "sightseeing", "hostel", "visa", "journey"),
    "finance": ("stocks", "budget", "loan", "interest", "investment", "dividend", "mortgage",
                "savings", "inflation", "portfolio", "bank", "tax"),
    "health": ("doctor", "fever", "vaccine", "clinic", "symptoms", "medicine", "nurse",
               "diagnosis", "therapy", "pharmacy", "illness", "hospital"),
    "animals": ("dog", "cat", "zebra", "elephant", "parrot", "tiger", "puppy", "kitten", "wolf",
                "giraffe", "rabbit", "hamster"),
    "technology": ("software", "laptop", "processor", "internet", "server", "algorithm",
                   "database", "smartphone", "keyboard", "browser", "compiler", "router"),
    "politics": ("election", "senator", "parliament", "vote", "campaign", "minister", "policy",
                 "ballot", "congress", "governor", "legislation", "candidate"),
    "education": ("teacher", "classroom", "homework", "exam", "student", "lecture", "school",
                  "syllabus", "tutor", "grades", "semester", "textbook"),
    "gardening": ("soil", "seeds", "tulip", "compost", "shovel", "weeds", "greenhouse", "fertilizer",
                  "hedge", "sprout", "rake", "orchard"),
    "space_travel": ("rocket", "astronaut", "orbit", "galaxy", "planet", "launch", "satellite",
                     "spaceship", "moon", "nebula", "telescope", "asteroid"),
    "movies": ("film", "actor", "director", "cinema", "screenplay", "trailer", "premiere",
               "popcorn", "sequel", "actress", "studio", "blockbuster"),
    "cars": ("engine", "tire", "sedan", "gearbox", "brakes", "mechanic", "fuel", "highway",
             "dashboard", "steering", "garage", "exhaust"),
    "fashion": ("dress", "jacket", "runway", "designer", "fabric", "sneakers", "scarf", "boutique",
                "denim", "jewelry", "tailor", "wardrobe"),
    "law": ("judge", "lawyer", "court", "verdict", "lawsuit", "jury", "contract", "attorney",
            "trial", "evidence", "appeal", "statute"),
    "ocean": ("wave", "coral", "whale", "tide", "shark", "reef", "dolphin", "seaweed", "harbor",
              "sailor", "lighthouse", "jellyfish"),
    "history": ("empire", "ancient", "medieval", "castle", "pharaoh", "revolution", "dynasty",
                "archive", "knight", "manuscript", "monarch", "ruins"),
    "art": ("painting", "canvas", "sculpture", "gallery", "brush", "portrait", "easel", "museum",
            "sketch", "watercolor", "mural", "exhibition"),
    "gaming": ("console", "joystick", "multiplayer", "quest", "avatar", "arcade", "controller",
               "respawn", "dungeon", "leaderboard", "speedrun", "level"),
    "real_estate": ("apartment", "landlord", "tenant", "rent", "realtor", "property", "lease",
                    "neighborhood", "condo", "bedroom", "renovation", "listing"),
    "science": ("experiment", "laboratory", "molecule", "hypothesis", "physics", "chemistry",
                "microscope", "atom", "biology", "theory", "researcher", "particle"),
    "food_delivery": ("courier", "takeout", "pizza", "order", "delivery", "burger", "sushi",
                      "tip", "menu", "restaurant", "driver", "noodles"),
}

FILLER: tuple[str, ...] = (
    "the", "a", "an", "and", "or", "but", "so", "then", "also", "very", "really", "quite", "some",
    "many", "few", "this", "that", "these", "those", "it", "they", "we", "you", "i", "he", "she",
    "there", "here", "today", "yesterday", "tomorrow", "again", "still", "just", "maybe", "about",
    "with", "from", "into", "over", "after", "before", "during", "while", "because", "when",
    "our", "their", "my", "your", "one", "two", "three", "new", "old", "other", "more", "most",
    "every", "each", "was", "were", "is", "are", "had", "have", "got", "saw", "said", "went",
    "made", "thing", "things", "time", "week", "day", "morning", "evening", "people", "friend",
    "family", "team", "place", "around", "near", "on", "in", "at", "of", "to", "for",
)

OPENERS: tuple[tuple[str, ...], ...] = (
    ("i", "think"), ("this", "note", "is", "about"), ("yesterday", "we", "talked", "about"),
    ("here", "is", "something", "on"), ("my", "friend", "mentioned"), ("we", "heard", "that"),
    ("someone", "wrote"), ("a", "quick", "update"), ("in", "the", "news"), ("just", "saw"),
    ("apparently",), ("so",), (), (),
)

SENTIMENT: dict[str, tuple[str, ...]] = {
    "positive": ("great", "wonderful", "excellent", "amazing", "lovely", "fantastic", "enjoyed",
                 "delightful", "brilliant", "happy", "pleased", "superb"),
    "negative": ("terrible", "awful", "horrible", "disappointing", "bad", "hated", "dreadful",
                 "annoying", "miserable", "poor", "unhappy", "worst"),
    "neutral": ("okay", "average", "ordinary", "fine", "standard", "typical", "acceptable",
                "moderate", "usual", "plain", "regular", "normal"),
}
NEGATIONS: tuple[str, ...] = ("not", "never", "hardly")

URGENCY: dict[str, tuple[str, ...]] = {
    "critical": ("emergency", "immediately", "outage", "danger", "catastrophic", "severe",
                 "alarm", "crisis", "evacuate", "broken", "failing", "asap"),
    "urgent": ("urgent", "soon", "deadline", "quickly", "today", "priority", "hurry", "promptly",
               "overdue", "tonight", "rush", "expedite"),
    "normal": ("scheduled", "planned", "update", "reminder", "routine", "weekly", "agenda",
               "review", "regular", "meeting", "status", "checkin"),
    "low_priority": ("whenever", "someday", "eventually", "optional", "later", "idea", "wishlist",
                     "nonurgent", "leisurely", "backlog", "sometime", "no_rush"),
}

INTENT: dict[str, tuple[str, ...]] = {
    "question": ("what", "why", "how", "which", "where", "wondering", "curious", "does", "who",
                 "whether", "explain", "clarify"),
    "request": ("please", "could", "would", "kindly", "need", "send", "provide", "help",
                "arrange", "requesting", "want", "book"),
    "complaint": ("complain", "unacceptable", "frustrated", "refund", "faulty", "late", "rude",
                  "damaged", "wrong", "missing", "angry", "problem"),
    "thanks": ("thanks", "thank", "grateful", "appreciate", "gratitude", "cheers", "thankful",
               "kind", "appreciated", "helpful", "generous", "owe"),
    "greeting": ("hello", "hi", "hey", "greetings", "welcome", "howdy", "nice", "meet",
                 "hiya", "introduce", "glad", "salutations"),
    "cancellation": ("cancel", "unsubscribe", "terminate", "stop", "withdraw", "revoke",
                     "discontinue", "quit", "end", "canceling", "rescind", "close"),
    "report": ("noticed", "observed", "found", "bug", "issue", "reported", "logged", "seeing",
               "detected", "incident", "spotted", "occurred"),
    "offer": ("offer", "discount", "deal", "free", "sale", "coupon", "bonus", "bargain",
              "promotion", "voucher", "special", "limited"),
}

# family -> (labels, default length range in words)
_LENGTHS: dict[str, tuple[int, int]] = {
    "topic": (6, 16),
    "topic_long": (28, 56),
    "sentiment": (6, 20),
    "urgency": (8, 24),
    "intent": (6, 20),
}
FAMILIES: tuple[str, ...] = tuple(_LENGTHS)


def _cue_table(family: str) -> dict[str, tuple[str, ...]]:
    if family in ("topic", "topic_long"):
        return TOPICS
    if family == "sentiment":
        return SENTIMENT
    if family == "urgency":
        return URGENCY
    if family == "intent":
        return INTENT
    raise UserError(f"unknown synthetic family {family!r}; choose one of {', '.join(FAMILIES)}",
                    field="family")


def family_labels(family: str) -> list[str]:
    """All labels of ``family``, sorted."""
    return sorted(_cue_table(family))


def _split_words(s: str) -> list[str]:
    return [w for w in s.split("_") if w]


def vocabulary() -> list[str]:
    """Every word the generator can emit (label words split on "_" included), sorted."""
    words: set[str] = set(FILLER) | set(NEGATIONS)
    for opener in OPENERS:
        words.update(opener)
    for table in (TOPICS, SENTIMENT, URGENCY, INTENT):
        for label, cues in table.items():
            words.update(_split_words(label))
            for cue in cues:
                words.update(_split_words(cue))
    return sorted(words)


# --------------------------------------------------------------------------------------------
# Sentence generation
# --------------------------------------------------------------------------------------------

def _emit(word: str) -> list[str]:
    return _split_words(word)


def _noisy_cue(rng: random.Random, table: dict[str, tuple[str, ...]], label: str,
               noise: float) -> str:
    if noise > 0 and rng.random() < noise:
        other = rng.choice([lb for lb in sorted(table) if lb != label])
        return rng.choice(table[other])
    return rng.choice(table[label])


def _sentence(rng: random.Random, family: str, label: str, noise: float, length: int) -> str:
    """One sentence of about ``length`` words for ``label`` of ``family``."""
    table = _cue_table(family)
    target = max(4, int(round(length * rng.uniform(0.75, 1.25))))
    core: list[list[str]] = []  # groups of words that must stay together
    if family in ("topic", "topic_long"):
        k_max = max(2, min(6, target // 4)) if family == "topic" else max(2, min(5, target // 10))
        for _ in range(rng.randint(2, k_max)):
            core.append(_emit(_noisy_cue(rng, TOPICS, label, noise)))
    else:
        n_cues = rng.randint(1, 3)
        for _ in range(n_cues):
            if family == "sentiment" and label != "neutral" and rng.random() < 0.3:
                # negated opposite: "not terrible" -> positive, "never great" -> negative
                opposite = "negative" if label == "positive" else "positive"
                cue = _noisy_cue(rng, table, opposite, noise)
                core.append([rng.choice(NEGATIONS)] + _emit(cue))
            else:
                core.append(_emit(_noisy_cue(rng, table, label, noise)))
        # topic keywords as distractor content, shared across families
        content_topic = rng.choice(sorted(TOPICS))
        for _ in range(rng.randint(1, 2)):
            core.append(_emit(rng.choice(TOPICS[content_topic])))
    opener = list(rng.choice(OPENERS))
    n_core = sum(len(g) for g in core)
    n_filler = max(0, target - len(opener) - n_core)
    groups = core + [[rng.choice(FILLER)] for _ in range(n_filler)]
    rng.shuffle(groups)
    words = opener + [w for g in groups for w in g]
    return " ".join(words)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown synthetic family {family!r}; choose one of {', '.join(FAMILIES)}",
                        field="family")


def generate_pool(family: str, seed: int, per_label: int = 40) -> list[Example]:
    """A labelled pool over all labels of ``family`` (``per_label`` rows each), deterministic."""
    _check_family(family)
    rng = random.Random(f"pool:{family}:{seed}")
    lo, hi = _LENGTHS[family]
    out = []
    for label in family_labels(family):
        for _ in range(per_label):
            length = rng.randint(lo, hi)
            text = _sentence(rng, family, label, 0.05, length)
            out.append(Example(text=text, label=label, extra={"domain": family}))
    return out


def generate_task(seed: int, family: str | None = None, ways: int | None = None,
                  shots: int | None = None, query: int = 10, noise: float | None = None,
                  length: int | None = None) -> Task:
    """A stratified N-way K-shot synthetic task, fully determined by the arguments.

    Unset knobs are drawn from ``seed``: family, ways (2..min(10, labels)), shots (2..16),
    noise (0..0.3) and length (the family's word-length range).
    """
    rng = random.Random(f"task:{seed}")
    if family is None:
        family = rng.choice(FAMILIES)
    _check_family(family)
    all_labels = family_labels(family)
    if ways is None:
        ways = rng.randint(2, min(10, len(all_labels)))
    if ways < 2 or ways > len(all_labels):
        raise UserError(f"ways must be between 2 and {len(all_labels)} for family {family!r}, "
                        f"got {ways}", field="ways")
    if shots is None:
        shots = rng.randint(2, 16)
    if shots < 1:
        raise UserError(f"shots must be at least 1, got {shots}", field="shots")
    if query < 1:
        raise UserError(f"query must be at least 1, got {query}", field="query")
    if noise is None:
        noise = round(rng.uniform(0.0, 0.3), 3)
    if not 0.0 <= noise <= 1.0:
        raise UserError(f"noise must be in [0, 1], got {noise}", field="noise")
    if length is None:
        length = rng.randint(*_LENGTHS[family])
    if length < 1:
        raise UserError(f"length must be positive, got {length}", field="length")
    labels = sorted(rng.sample(all_labels, ways))
    label_noise = noise / 2
    support: list[Example] = []
    query_set: list[Example] = []
    extra = {"domain": family}
    for label in labels:
        for _ in range(shots):
            source_label = label
            if label_noise > 0 and rng.random() < label_noise:
                source_label = rng.choice([lb for lb in labels if lb != label])
            support.append(Example(_sentence(rng, family, source_label, noise, length), label,
                                   dict(extra)))
        for _ in range(query):
            query_set.append(Example(_sentence(rng, family, label, noise, length), label,
                                     dict(extra)))
    rng.shuffle(support)
    rng.shuffle(query_set)
    return Task(name=f"synthetic-{family}-seed{seed}", support=support, query=query_set,
                labels=labels,
                meta={"source": "synthetic", "family": family, "ways": ways, "shots": shots,
                      "query": query, "noise": noise, "label_noise": label_noise,
                      "length": length, "seed": seed})
