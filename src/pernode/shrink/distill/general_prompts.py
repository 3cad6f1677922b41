"""General chat prompts for a draft's training replies: the kinds of turn a chat workload is made of (facts,
explanations, arithmetic, e-mails, summaries and rewrites, tables, code, translation, plans, poems, advice),
built from forms and word lists written here, so nothing is downloaded.

A draft (an EAGLE head, a distilled student) is judged on how often it predicts what the served model says
(Kim & Rush 2016; Li et al. 2024 train on chat too). Prompts about stdlib modules (sequence_kd.py) teach it the
served model's answers about Python only; these cover general chat. The benchmark's own chat prompts
(measure/bench/datasets.CHAT_MIX) are the evaluation set and are never produced here: `general_chat_prompts`
drops any prompt equal to one of them. Paragraphs to summarise or rewrite come from the training split of the
stdlib docstrings (data.is_heldout), never from the held-out files or the perplexity text.
"""
from __future__ import annotations

import random

COUNTRIES = ("France", "Japan", "Canada", "Brazil", "Kenya", "Norway", "Egypt", "Mexico", "India", "Spain",
             "Italy", "Germany", "Chile", "Peru", "Vietnam", "Poland", "Ireland", "Portugal", "Greece", "Turkey",
             "Argentina", "Morocco", "Sweden", "Finland", "Thailand", "Indonesia", "Nigeria", "Ghana", "Austria",
             "Hungary", "Denmark", "Iceland", "New Zealand", "South Korea", "Colombia", "Cuba", "Nepal", "Jordan")
CITIES = ("Lisbon", "Prague", "Vienna", "Istanbul", "Barcelona", "Seoul", "Hanoi", "Marrakesh", "Edinburgh",
          "Copenhagen", "Mexico City", "Buenos Aires", "Cape Town", "Vancouver", "Osaka", "Rome", "Budapest",
          "Bangkok", "Reykjavik", "Florence", "Dublin", "Montreal", "Singapore", "Athens")
INTERESTS = ("museums", "hiking", "street food", "architecture", "beaches", "history", "music", "markets",
             "coffee", "art galleries", "cycling", "photography", "wine", "old churches", "parks")
ANIMALS = ("cat", "dog", "puppy", "kitten", "parrot", "hamster", "goldfish", "rabbit", "turtle", "horse", "pony")
COLOURS = ("grey", "black", "white", "ginger", "spotted", "tiny", "fluffy", "lazy", "brave", "noisy")
UNITS = (("seconds", "day"), ("minutes", "day"), ("hours", "week"), ("days", "leap year"), ("seconds", "hour"),
         ("minutes", "month of 30 days"), ("hours", "year"), ("weeks", "decade"), ("days", "three years"))
PHENOMENA = ("why leaves change colour in autumn", "how a rainbow forms", "why the sea is salty",
             "how vaccines train the immune system", "why we have seasons", "how airplanes stay in the air",
             "what causes thunder", "how a refrigerator keeps food cold", "why bread rises",
             "how the moon causes tides", "why metal feels colder than wood", "how solar panels make electricity",
             "what makes a volcano erupt", "why the sun looks orange at sunset", "how a compass works",
             "why cats purr", "how noise-cancelling headphones work", "what causes earthquakes")
WHY = ("do onions make people cry", "does bread go stale", "do we get hiccups", "does the moon change shape",
       "do birds migrate", "does popcorn pop", "do planes leave white trails", "is the ocean blue",
       "do we yawn", "does salt melt ice", "do stars twinkle", "does a spoon look bent in a glass of water")
PAIRS = (("a list", "a set", "Python"), ("a process", "a thread", "an operating system"),
         ("TCP", "UDP", "networking"), ("a class", "an instance", "Python"), ("RAM", "storage", "a computer"),
         ("an array", "a linked list", "programming"), ("compiling", "interpreting", "programming languages"),
         ("a dictionary", "a list of pairs", "Python"), ("git merge", "git rebase", "git"),
         ("SQL", "NoSQL databases", "data storage"), ("a function", "a method", "Python"),
         ("a stack", "a queue", "computer science"), ("HTTP", "HTTPS", "the web"))
TONES = ("short, friendly", "polite", "brief, professional", "warm", "short, formal")
EMAILS = ("asking my manager for a day off next Monday", "thanking a colleague for help with a report",
          "inviting the team to a lunch on Friday", "asking a landlord to fix a leaking tap",
          "reminding a client that an invoice is due", "apologising for missing a meeting",
          "asking a professor for an extension on an essay", "welcoming a new member to the team",
          "declining a meeting invitation politely", "following up on a job interview",
          "asking a neighbour to keep the noise down after ten", "telling the team the office is closed tomorrow")
ACTIVITIES = ("living in a big city", "learning to code at 40", "owning an electric car", "remote schooling",
              "renting instead of buying a home", "using a standing desk", "travelling alone",
              "keeping a cat in a flat", "a four-day work week", "cooking at home every day",
              "studying abroad", "social media for teenagers", "open-plan offices")
CODE_TASKS = ("checks whether a string is a palindrome", "counts the vowels in a sentence",
              "returns the largest of three numbers", "reverses a list without using reverse()",
              "converts Celsius to Fahrenheit", "removes duplicates from a list while keeping the order",
              "computes the factorial of n recursively", "checks whether a number is prime",
              "merges two sorted lists", "counts how often each word appears in a text",
              "returns the sum of the digits of an integer", "finds the second smallest number in a list",
              "flattens a list of lists", "validates a simple e-mail address")
TECH = ("HTTP status code 404", "HTTP status code 503", "a DNS lookup", "a CPU cache", "an API key",
        "HTTP status code 301", "a race condition", "a memory leak", "a firewall", "latency", "a VPN",
        "an SSL certificate", "a cookie in a web browser", "a database index")
FOLLOW_UPS = ("why does it matter", "how should a developer deal with it", "give an everyday example",
              "when would I run into it")
LANGUAGES = ("French", "Spanish", "German", "Italian")
SENTENCES = ("The train leaves at eight in the morning.", "Could you send me the report by tomorrow?",
             "We are going to the beach this weekend.", "My sister lives in a small house near the river.",
             "The shop is closed on Sundays.", "I would like a cup of coffee, please.",
             "The weather will be cold and windy tonight.", "Thank you for your help yesterday.",
             "The children are playing in the garden.", "Where is the nearest train station?")
POEMS = ("haiku", "short poem", "limerick", "four-line poem")
POEM_SUBJECTS = ("the first snow", "a city at night", "the ocean", "an old tree", "morning coffee", "a lost key",
                 "spring flowers", "a sleepy cat", "the stars", "a summer storm", "a train journey")
STRUCTURES = ("a binary search tree", "a heap", "a queue", "a graph", "a linked list", "a bloom filter", "a trie")
ADVICE = ("How can I sleep better?", "How do I start running if I have never exercised?",
          "What are good ways to save money on groceries?", "How can I stay focused while working from home?",
          "How do I prepare for a job interview?", "How can I learn a new language faster?",
          "What should I pack for a weekend camping trip?", "How do I keep houseplants alive?",
          "How can I make a short presentation less stressful?", "What are some tips for writing a clear e-mail?")
DISHES = ("a simple tomato soup", "pancakes", "a vegetable stir-fry", "guacamole", "a lentil curry",
          "banana bread", "a Greek salad", "scrambled eggs")
STORY = ("a robot who learns to paint", "a lighthouse keeper and a storm", "a lost dog finding its way home",
         "a girl who can talk to birds", "a detective in a small village", "two friends on a long road trip")


def _forms(rng: random.Random, paragraph: str) -> list[str]:
    """One prompt of every form, fillers drawn from `rng`."""
    a, b, field = rng.choice(PAIRS)
    small, big = rng.choice(UNITS)
    c1, c2 = rng.sample(INTERESTS, 2)
    return [
        f"What is the capital of {rng.choice(COUNTRIES)}?",
        f"Give me {rng.choice(('three', 'five', 'four'))} names for a {rng.choice(COLOURS)} {rng.choice(ANIMALS)}.",
        f"How many {small} are there in a {big}? Show the arithmetic.",
        f"Explain in simple terms {rng.choice(PHENOMENA)}.",
        f"Why {rng.choice(WHY)}?",
        f"What is the difference between {a} and {b} in {field}?",
        f"Write a {rng.choice(TONES)} email {rng.choice(EMAILS)}.",
        f"Summarize this in {rng.choice(('two sentences', 'one sentence', 'three bullet points'))}:\n\n{paragraph}",
        f"Rewrite this paragraph for a {rng.choice(('ten-year-old', 'beginner', 'busy manager'))}:\n\n{paragraph}",
        f"List the pros and cons of {rng.choice(ACTIVITIES)} as a table.",
        f"Write a Python function that {rng.choice(CODE_TASKS)}, with a docstring.",
        f"What does {rng.choice(TECH)} mean, and {rng.choice(FOLLOW_UPS)}?",
        f"Translate to {rng.choice(LANGUAGES)}: '{rng.choice(SENTENCES)}'",
        f"Plan a {rng.choice(('two', 'three', 'four'))}-day trip to {rng.choice(CITIES)} for someone who likes "
        f"{c1} and {c2}.",
        f"Write a {rng.choice(POEMS)} about {rng.choice(POEM_SUBJECTS)}.",
        f"Explain what {rng.choice(STRUCTURES)} is, how it works, and what its operations cost.",
        rng.choice(ADVICE),
        f"Give me a short recipe for {rng.choice(DISHES)}.",
        f"Write the opening paragraph of a story about {rng.choice(STORY)}.",
    ]


def general_chat_prompts(count: int, paragraphs: list[str], seed: int = 0,
                         excluded: tuple[str, ...] = ()) -> list[str]:
    """`count` prompts cycling through every form with seeded fillers; `paragraphs` feed the summarise/rewrite
    forms (a form needing one is skipped when there are none). Every prompt is new: none repeats, none equals one in
    `excluded`; fewer than `count` come back only when the word lists have no new ones left."""
    rng = random.Random(seed)
    seen = set(excluded)
    out: list[str] = []
    idle_rounds = 0
    while len(out) < count and idle_rounds < 100:  # the word lists can run out of new prompts: stop, not loop
        paragraph = rng.choice(paragraphs) if paragraphs else ""
        before = len(out)
        for prompt in _forms(rng, paragraph):
            if (paragraph or not prompt.endswith(":\n\n")) and prompt not in seen and len(out) < count:
                seen.add(prompt)
                out.append(prompt)
        idle_rounds = idle_rounds + 1 if len(out) == before else 0
    return out
