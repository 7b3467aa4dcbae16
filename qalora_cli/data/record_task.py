"""The embedded instruction dataset: record extraction, made here by a seeded generator.

No instruction dataset ships offline, so the project makes its own: one sentence about a
fictional person, phrased in many ways with the facts in varying order, and the answer as a
compact JSON object with a fixed key order. A small chat model does not answer in exactly
that form unprompted (near 0% exact match); a short fine-tune teaches it (high exact match).

Evaluation tests generalization, not recall: eval records draw first names, surnames and
cities from pools disjoint from the training pools, so an adapter that memorised training
names cannot score by recall. Jobs and ages are shared: they are part of the schema to learn.
"""

from __future__ import annotations

import json
import random

INSTRUCTION = "Extract the person's name, age, city and job from the text as JSON."
KEYS = ("name", "age", "city", "job")

TRAIN_FIRST = (
    "Maria", "James", "Anna", "David", "Laura", "Michael", "Sofia", "Daniel", "Elena", "Thomas",
    "Julia", "Robert", "Clara", "Peter", "Nina", "Andrew", "Sarah", "Lucas", "Emma", "Mark",
    "Hannah", "Paul", "Olivia", "George", "Alice", "Victor", "Grace", "Samuel", "Irene", "Oscar",
    "Rachel", "Felix", "Diana", "Hugo", "Marta", "Simon", "Helen", "Adam", "Rosa", "Martin",
)
TRAIN_LAST = (
    "Lopez", "Smith", "Novak", "Garcia", "Muller", "Rossi", "Brown", "Kowalski", "Silva", "Meyer",
    "Johnson", "Dubois", "Jensen", "Costa", "Fischer", "Taylor", "Moreau", "Nilsson", "Ferrari", "Wilson",
    "Santos", "Weber", "Clarke", "Horvat", "Bianchi", "Evans", "Lindqvist", "Petrov", "Walsh", "Romero",
    "Hughes", "Schmidt", "Ortiz", "Baker", "Kramer", "Reyes", "Turner", "Vogel", "Morales", "Fleming",
)
TRAIN_CITIES = (
    "Lisbon", "Berlin", "Toronto", "Madrid", "Chicago", "Vienna", "Sydney", "Prague", "Dublin", "Oslo",
    "Boston", "Lyon", "Warsaw", "Seattle", "Munich", "Porto", "Denver", "Naples", "Helsinki", "Osaka",
    "Buenos Aires", "Cape Town", "Mexico City", "New Delhi", "Hong Kong",
)
EVAL_FIRST = (
    "Ingrid", "Tobias", "Yasmin", "Rafael", "Leila", "Dmitri", "Camille", "Marcus", "Aisha", "Nikolai",
    "Freya", "Omar", "Beatrice", "Henrik", "Lucia", "Stefan", "Noemi", "Kenji", "Vera", "Elliot",
)
EVAL_LAST = (
    "Okafor", "Haugen", "Castillo", "Brennan", "Takahashi", "Varga", "Lindgren", "Mendoza", "Achterberg",
    "Kovacs", "Delgado", "Whitaker", "Sorensen", "Ivanova", "Pereira", "Mahler", "Quinn", "Yilmaz",
    "Duarte", "Blackwood",
)
EVAL_CITIES = (
    "Montreal", "Edinburgh", "Krakow", "Valencia", "Nairobi", "Auckland", "Bergen", "Seville", "Tallinn",
    "Bologna", "Kyoto", "San Diego", "Rio de Janeiro", "Kuala Lumpur", "Salt Lake City",
)
JOBS = (
    "nurse", "teacher", "engineer", "architect", "baker", "pilot", "lawyer", "chemist", "plumber",
    "journalist", "dentist", "librarian", "electrician", "accountant", "photographer", "carpenter",
    "pharmacist", "translator", "gardener", "software developer", "police officer", "chef",
    "veterinarian", "firefighter", "economist", "graphic designer", "mechanic", "biologist",
    "tailor", "bus driver",
)

# Many phrasings, the four facts in different orders, some with a distracting first-name-only
# mention, so the task is reading the sentence rather than copying a fixed slot.
# Fields: {name}, {first}, {age}, {city}, {job}, {a_job} (job with its article).
TEMPLATES = (
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as {a_job} in {city}.",
    "In {city}, {age}-year-old {name} earns a living as {a_job}.",
    "{name} ({age}) lives in {city} and works as {a_job}.",
    "Working as {a_job} in {city}, {name} turned {age} this year.",
    "Age: {age}. Home: {city}. Occupation: {job}. Name: {name}.",
    "{city} is home to {name}, {a_job} who is {age} years old.",
    "At {age}, {name} already works as {a_job} in {city}.",
    "The {job} {name} is {age} years old and lives in {city}.",
    "After moving to {city}, {name} found work as {a_job}; {first} is {age} now.",
    "{name} is {age}. {first} works as {a_job} and lives in {city}.",
    "Profile: {name}, {job}, {age} years, based in {city}.",
    "Everyone in {city} knows {name}, the local {job}, who just celebrated turning {age}.",
    "Our records list {name} as {a_job}, aged {age}, living in {city}.",
    "A {age}-year-old from {city}, {name} has been {a_job} for years.",
    "{job} by trade, {name} is {age} and resides in {city}.",
)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _record(rng: random.Random, firsts, lasts, cities) -> dict:
    first, last = rng.choice(firsts), rng.choice(lasts)
    name, age, city, job = f"{first} {last}", rng.randint(19, 78), rng.choice(cities), rng.choice(JOBS)
    text = rng.choice(TEMPLATES).format(name=name, first=first, age=age, city=city, job=job,
                                        a_job=_article(job))
    text = text[0].upper() + text[1:]
    # json.dumps keeps insertion order: the fixed key order is the one exact-match compares.
    output = json.dumps(dict(zip(KEYS, (name, age, city, job))), ensure_ascii=False)
    return {"instruction": INSTRUCTION, "input": text, "output": output}


def record_task(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """-> (train, eval) records {instruction, input, output}; deterministic for a given seed.

    n records in all: eval is 10% of them (at least 20), train the rest (at least 20, so a
    small n gives slightly more than n records)."""
    n_eval = max(20, n // 10)
    n_train = max(20, n - n_eval)
    # Separate streams: a larger n extends each set without reshuffling the other.
    train_rng, eval_rng = random.Random(f"{seed}-train"), random.Random(f"{seed}-eval")
    train = [_record(train_rng, TRAIN_FIRST, TRAIN_LAST, TRAIN_CITIES) for _ in range(n_train)]
    evals = [_record(eval_rng, EVAL_FIRST, EVAL_LAST, EVAL_CITIES) for _ in range(n_eval)]
    return train, evals
