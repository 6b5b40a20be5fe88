"""Phrasing pools of the reading-model data (:mod:`.reading`): every pool is written out per split
(``"train"``, ``"dev"``, ``"test"``) so no template, frame, needle or general question is shared between splits.

Fact predicates hold ``{value}`` and follow a subject (``"Mira Dolan" + " was born in Tessaly"``); questions hold
``{name}`` (the entity's full name). Frames hold ``{name}`` (the main entity) and may hold ``{reader}`` / ``{writer}``
(invented people without facts). Needles hold ``{n}``. Nothing here contains a digit.
"""

from __future__ import annotations

from . import reading_pools_train as T

#: the gold answer of a question about the document that the document does not answer
NOT_STATED = "The document does not say."

#: person attributes with prose answers: value kind (see :mod:`.reading`), predicates and questions per split
PERSON_ATTRIBUTES: dict[str, dict] = {
    "birthplace": {"value": "city", "preds": {
        "train": T.PERSON_TRAIN["birthplace"]["preds"],
        "dev": ["first saw the light of day in {value}", "is a native of {value}"],
        "test": ["was born in the town of {value}",
                 "spent the first years of life in {value}, where the family lived"]},
        "questions": {
        "train": T.PERSON_TRAIN["birthplace"]["questions"],
        "dev": ["Which town is {name} a native of?", "Where did {name} first see the light of day?"],
        "test": ["What city did {name} come from originally?", "Name the place where {name} was born."]}},
    "home_city": {"value": "city", "preds": {
        "train": T.PERSON_TRAIN["home_city"]["preds"],
        "dev": ["currently resides in {value}", "rents a flat in {value}"],
        "test": ["moved to {value} a few years ago and stayed", "keeps a house in {value} today"]},
        "questions": {
        "train": T.PERSON_TRAIN["home_city"]["questions"],
        "dev": ["Where does {name} currently reside?", "In what city does {name} rent a flat?"],
        "test": ["Which city does {name} call home today?", "Where is the current home of {name}?"]}},
    "employer": {"value": "org", "preds": {
        "train": T.PERSON_TRAIN["employer"]["preds"],
        "dev": ["draws a salary from {value}", "joined the staff of {value}"],
        "test": ["spends the working week at {value}", "is on the payroll of {value}"]},
        "questions": {
        "train": T.PERSON_TRAIN["employer"]["questions"],
        "dev": ["Which organisation pays the salary of {name}?", "Whose staff did {name} join?"],
        "test": ["At which company does {name} spend the working week?", "Who employs {name}?"]}},
    "profession": {"value": "profession", "preds": {
        "train": T.PERSON_TRAIN["profession"]["preds"],
        "dev": ["trained to become a {value}", "has a career as a {value}"],
        "test": ["makes a living as a {value}", "holds a position as a {value}"]},
        "questions": {
        "train": T.PERSON_TRAIN["profession"]["questions"],
        "dev": ["What did {name} train to become?", "Which career does {name} have?"],
        "test": ["What is {name}'s occupation?", "What kind of work does {name} do?"]}},
    "instrument": {"value": "instrument", "preds": {
        "train": T.PERSON_TRAIN["instrument"]["preds"],
        "dev": ["performs on the {value} in a local orchestra", "owns and plays a {value}"],
        "test": ["took lessons on the {value} for many years", "is a talented {value} player"]},
        "questions": {
        "train": T.PERSON_TRAIN["instrument"]["questions"],
        "dev": ["On which instrument does {name} perform?", "What instrument does {name} own and play?"],
        "test": ["Which musical instrument is {name} good at?", "What instrument did {name} take lessons on?"]}},
    "spouse": {"value": "person", "preds": {
        "train": T.PERSON_TRAIN["spouse"]["preds"],
        "dev": ["wed {value} in a small ceremony", "has a spouse named {value}"],
        "test": ["said yes when {value} proposed", "has been married to {value} for a long time"]},
        "questions": {
        "train": T.PERSON_TRAIN["spouse"]["questions"],
        "dev": ["Who did {name} wed?", "What is the name of {name}'s spouse?"],
        "test": ["Who is {name}'s husband or wife?", "To whom is {name} married?"]}},
    "object": {"value": "object", "preds": {
        "train": T.PERSON_TRAIN["object"]["preds"],
        "dev": ["inherited a {value} from a grandparent", "carries a {value} everywhere"],
        "test": ["bought a {value} at a market", "was given a {value} as a gift"]},
        "questions": {
        "train": T.PERSON_TRAIN["object"]["questions"],
        "dev": ["What did {name} inherit from a grandparent?", "What does {name} carry everywhere?"],
        "test": ["What did {name} buy at a market?", "What was {name} given as a gift?"]}},
    "school": {"value": "school", "preds": {
        "train": T.PERSON_TRAIN["school"]["preds"],
        "dev": ["attended {value}", "completed an education at {value}"],
        "test": ["spent student years at {value}", "holds a diploma from {value}"]},
        "questions": {
        "train": T.PERSON_TRAIN["school"]["questions"],
        "dev": ["Which institution did {name} attend?", "Where did {name} complete an education?"],
        "test": ["Where did {name} spend student years?", "Which school gave {name} a diploma?"]}},
}

#: numeric attributes: the entity kind they describe, the number kind, digit range (integers), phrasings per split
NUMBER_ATTRIBUTES: dict[str, dict] = {
    "founded": {"entity": "org", "kind": "year", "preds": {
        "train": T.NUMBER_TRAIN["founded"]["preds"],
        "dev": ["was established in {value}", "started trading in {value}"],
        "test": ["was set up in the year {value}", "traces its beginnings to {value}"]}, "questions": {
        "train": T.NUMBER_TRAIN["founded"]["questions"],
        "dev": ["When was {name} established?", "In which year did {name} start trading?"],
        "test": ["What year was {name} set up?", "To which year does {name} trace its beginnings?"]}},
    "staff": {"entity": "org", "kind": "integer", "digits": (1, 6), "preds": {
        "train": T.NUMBER_TRAIN["staff"]["preds"],
        "dev": ["pays {value} workers", "has {value} people on staff"],
        "test": ["gives work to {value} people", "lists {value} employees on its books"]}, "questions": {
        "train": T.NUMBER_TRAIN["staff"]["questions"],
        "dev": ["How many workers does {name} pay?", "How many people are on staff at {name}?"],
        "test": ["To how many people does {name} give work?", "How many employees are on the books of {name}?"]}},
    "revenue": {"entity": "org", "kind": "amount", "preds": {
        "train": T.NUMBER_TRAIN["revenue"]["preds"],
        "dev": ["booked {value} in annual sales", "took in {value} over the year"],
        "test": ["closed the year with a turnover of {value}", "brought in {value} according to its accounts"]},
        "questions": {
        "train": T.NUMBER_TRAIN["revenue"]["questions"],
        "dev": ["How much did {name} book in annual sales?", "How much did {name} take in over the year?"],
        "test": ["What was the turnover of {name}?", "How much did {name} bring in according to its accounts?"]}},
    "registration": {"entity": "org", "kind": "integer", "digits": (1, 8), "preds": {
        "train": T.NUMBER_TRAIN["registration"]["preds"],
        "dev": ["appears in the register as entry {value}", "holds licence number {value}"],
        "test": ["files its papers under reference {value}", "is recorded in the trade register with number {value}"]},
        "questions": {
        "train": T.NUMBER_TRAIN["registration"]["questions"],
        "dev": ["Which register entry belongs to {name}?", "What licence number does {name} hold?"],
        "test": ["Under which reference does {name} file its papers?", "What is {name}'s trade register number?"]}},
    "product_code": {"entity": "org", "kind": "code", "preds": {
        "train": T.NUMBER_TRAIN["product_code"]["preds"],
        "dev": ["catalogues its most popular product as {value}", "markets its lead item with code {value}"],
        "test": ["stamps its best seller with the code {value}", "gave its newest product the code {value}"]},
        "questions": {
        "train": T.NUMBER_TRAIN["product_code"]["questions"],
        "dev": ["What catalogue code does {name} use for its most popular product?",
                "Which code does {name} market its lead item with?"],
        "test": ["Which code is stamped on the best seller of {name}?",
                 "What code did {name} give its newest product?"]}},
    "birth_year": {"entity": "person", "kind": "year", "preds": {
        "train": T.NUMBER_TRAIN["birth_year"]["preds"],
        "dev": ["has {value} as birth year", "was born back in {value}"],
        "test": ["has a birth certificate dated {value}", "came into this world in the year {value}"]}, "questions": {
        "train": T.NUMBER_TRAIN["birth_year"]["questions"],
        "dev": ["Which year is {name}'s birth year?", "Back in which year was {name} born?"],
        "test": ["What year is on {name}'s birth certificate?", "In which year did {name} come into this world?"]}},
    "house_number": {"entity": "person", "kind": "integer", "digits": (1, 4), "preds": {
        "train": T.NUMBER_TRAIN["house_number"]["preds"],
        "dev": ["resides at number {value} on the street", "painted the number {value} on the front door"],
        "test": ["moved into the house numbered {value}", "can be found at door {value}"]}, "questions": {
        "train": T.NUMBER_TRAIN["house_number"]["questions"],
        "dev": ["At which number on the street does {name} reside?", "Which number is on {name}'s front door?"],
        "test": ["What is the number of the house {name} moved into?", "At which door can {name} be found?"]}},
    "member_id": {"entity": "person", "kind": "integer", "digits": (1, 8), "preds": {
        "train": T.NUMBER_TRAIN["member_id"]["preds"],
        "dev": ["signs in with account number {value}", "uses the customer number {value}"],
        "test": ["is enrolled under the identifier {value}", "shows the pass number {value} at the gate"]},
        "questions": {
        "train": T.NUMBER_TRAIN["member_id"]["questions"],
        "dev": ["Which account number does {name} sign in with?", "What customer number does {name} use?"],
        "test": ["Under which identifier is {name} enrolled?", "What pass number does {name} show at the gate?"]}},
    "savings": {"entity": "person", "kind": "amount", "preds": {
        "train": T.NUMBER_TRAIN["savings"]["preds"],
        "dev": ["inherited a sum of {value}", "won {value} in a contest"],
        "test": ["paid {value} for a used car", "donated {value} to a local charity"]}, "questions": {
        "train": T.NUMBER_TRAIN["savings"]["questions"],
        "dev": ["How much did {name} inherit?", "How much did {name} win in a contest?"],
        "test": ["How much did {name} pay for a used car?", "How much did {name} donate to a local charity?"]}},
    "locker_code": {"entity": "person", "kind": "code", "preds": {  # one thing per split: every phrasing and
        "train": T.NUMBER_TRAIN["locker_code"]["preds"],
        "dev": ["was issued the parking permit {value}", "holds the parking permit {value}"],
        "test": ["checked in with the luggage tag {value}", "had the luggage tag {value} on the suitcase"]},
        "questions": {
        "train": T.NUMBER_TRAIN["locker_code"]["questions"],
        "dev": ["Which parking permit was {name} issued?", "What is the number of {name}'s parking permit?"],
        "test": ["What luggage tag did {name} check in with?", "Which luggage tag was on {name}'s suitcase?"]}},
}

#: sentence openers (empty = none) and document frames (intro, outro) per split
OPENERS = {"train": T.OPENERS_TRAIN,
           "dev": ["", "", "", "By all accounts, ", "Neighbours report that "],
           "test": ["", "", "", "Apparently, ", "The records show that "]}
FRAMES = {
    "train": T.FRAMES_TRAIN,
    "dev": [("interview", "Notes from an interview with {name}.", "End of notes."),
            ("newsletter", "Club newsletter. This month's member spotlight is on {name}.",
             "Members are invited to the next meeting."),
            ("plain", "", "")],
    "test": [("diary", "Dear diary,\n\nToday I finally learned a few things about {name}.", "More tomorrow.\n{writer}"),
             ("programme", "Speaker profile: {name}.", "Questions may be asked after the talk."),
             ("placard", "Museum label. {name}", "This display is part of the permanent collection."),
             ("plain", "", "")],
}

#: needle groups per split: (statements, questions); statements hold {n}
NEEDLES = {
    "train": T.NEEDLES_TRAIN,
    "dev": [(["The access code for the side door is {n}.", "To enter by the side door, type {n}."],
             ["What is the access code for the side door?", "Which code opens the side door?"]),
            (["Hidden somewhere in this text is the number {n}."],
             ["What number is hidden in the text?", "Which number was hidden in this text?"])],
    "test": [(["The combination of the blue locker is {n}.", "To open the blue locker, dial {n}."],
              ["What is the combination of the blue locker?", "Which combination opens the blue locker?"]),
             (["The wifi password for guests is {n}."],
              ["What is the wifi password for guests?", "Which password do guests use for the wifi?"])],
}

#: needle groups whose questions any planted number answers ("Which number was hidden in this text?"): a question
#: of such a group is never the unanswered question of a document holding another group's needle
GENERIC_NEEDLES = {"train": frozenset(), "dev": frozenset({1}), "test": frozenset()}

#: unanswered needle questions used in place of a generic group's (numbered things no needle of the split names)
ABSENT_NEEDLE_QUESTIONS = {
    "train": ["What is the prescription number at the pharmacy?", "Which kennel number does the dog sleep in?"],
    "dev": ["Which gate does the island ferry leave from?", "What is the serial number of the old projector?"],
    "test": ["What is the frame number of the stolen scooter?", "Which berth is the cargo ship moored at?"],
}

#: general-knowledge questions with a fixed short answer, per split (the document never holds the answer)
GENERAL_QUESTIONS = {
    "train": [("Name the capital city of France.", "Paris"), ("How many days does a week have?", "Seven"),
              ("What colour is the sky on a clear day?", "Blue"), ("What do bees make?", "Honey"),
              ("What is the largest planet in the solar system?", "Jupiter"),
              ("Which word means the opposite of hot?", "Cold"),
              ("What is frozen water called?", "Ice"), ("Which animal says moo?", "A cow"),
              ("Germany's capital is which city?", "Berlin"), ("How many legs does a spider have?", "Eight"),
              ("What gas do plants take in from the air?", "Carbon dioxide"),
              ("What is the first letter of the English alphabet?", "A"),
              ("Which ocean lies between Europe and North America?", "The Atlantic Ocean"),
              ("What do you call a baby cat?", "A kitten")],
    "dev": [("What is the capital of Italy?", "Rome"), ("How many months are there in a year?", "Twelve"),
            ("What colour is fresh grass?", "Green"), ("Which planet is known as the red planet?", "Mars"),
            ("What is the opposite of up?", "Down"), ("What is the capital of Spain?", "Madrid"),
            ("How many wheels does a bicycle have?", "Two")],
    "test": [("What is the capital of Japan?", "Tokyo"), ("How many hours are there in a day?", "Twenty-four"),
             ("What colour is snow?", "White"), ("What is the closest star to the Earth?", "The Sun"),
             ("What is the opposite of wet?", "Dry"), ("What is the capital of England?", "London"),
             ("How many sides does a triangle have?", "Three")],
}

#: chit-chat questions; their gold is the base model's own answer without the document (filled by the caller)
CHITCHAT_QUESTIONS = {
    "train": ["Hello! How are you today?", "Can you tell me a short joke?", "What should I cook for dinner tonight?",
              "Give me one tip for sleeping better.", "Suggest a good name for a goldfish.",
              "Say something nice to cheer me up."],
    "dev": ["Good morning! How is it going?", "Can you suggest a hobby to try?",
            "What is a fun thing to do on a rainy day?"],
    "test": ["Hi there, how do you feel today?", "Can you recommend a board game?",
             "What is a good way to relax after work?"],
}

#: real-word value pools (shared by the splits; invented names and places are split by a word hash instead)
PROFESSIONS = ["marine biologist", "pastry chef", "tax lawyer", "civil engineer", "school teacher", "bus driver",
               "dental nurse", "landscape architect", "museum curator", "airline pilot", "wedding photographer",
               "software developer", "veterinary surgeon", "police officer", "hotel manager", "stage designer",
               "fire fighter", "radio presenter", "speech therapist", "furniture maker", "court interpreter",
               "social worker", "sound engineer", "tour guide", "shoe repairer", "crane operator", "beekeeper",
               "locksmith", "glass blower", "data analyst"]
INSTRUMENTS = ["cello", "bass clarinet", "french horn", "violin", "grand piano", "alto saxophone", "harp", "oboe",
               "double bass", "trumpet", "bagpipes", "accordion", "electric guitar", "tuba", "mandolin", "flute",
               "bassoon", "xylophone", "ukulele", "church organ", "banjo", "trombone"]
OBJECTS = ["antique brass compass", "red canoe", "signed football", "silver pocket watch", "wooden rocking chair",
           "vintage typewriter", "stained glass lamp", "leather notebook", "model steam train", "porcelain teapot",
           "mountain bike", "telescope", "painted chess set", "woollen scarf", "copper kettle", "sailing boat",
           "blue umbrella", "oak bookshelf", "record player", "straw hat", "ceramic vase", "hand drum"]
ORG_SUFFIXES = ["Textiles", "Shipping Company", "Bank", "Bakery", "Institute", "Software", "Foundry", "Motors",
                "Publishing House", "Hospital", "Brewery", "Insurance", "Logistics", "Theatre", "Dairy"]
SCHOOL_FORMS = ["the University of {w}", "{w} College", "{w} Academy of Music", "the {w} School of Design",
                "{w} Technical Institute"]
CURRENCIES = ("$", "€", "£")

__all__ = ["ABSENT_NEEDLE_QUESTIONS", "CHITCHAT_QUESTIONS", "CURRENCIES", "FRAMES", "GENERAL_QUESTIONS",
           "GENERIC_NEEDLES", "INSTRUMENTS", "NEEDLES", "NOT_STATED", "NUMBER_ATTRIBUTES", "OBJECTS", "OPENERS",
           "ORG_SUFFIXES", "PERSON_ATTRIBUTES", "PROFESSIONS", "SCHOOL_FORMS"]
