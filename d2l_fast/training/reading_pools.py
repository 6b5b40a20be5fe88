"""Phrasing pools of the reading-model data (:mod:`.reading`): every pool is written out per split
(``"train"``, ``"dev"``, ``"test"``) so no template, frame, needle or general question is shared between splits.

Fact predicates hold ``{value}`` and follow a subject (``"Mira Dolan" + " was born in Tessaly"``); questions hold
``{name}`` (the entity's full name). Frames hold ``{name}`` (the main entity) and may hold ``{reader}`` / ``{writer}``
(invented people without facts). Needles hold ``{n}``. Nothing here contains a digit.
"""

from __future__ import annotations

#: the gold answer of a question about the document that the document does not answer
NOT_STATED = "The document does not say."

#: person attributes with prose answers: value kind (see :mod:`.reading`), predicates and questions per split
PERSON_ATTRIBUTES: dict[str, dict] = {
    "birthplace": {"value": "city", "preds": {
        "train": ["was born in {value}", "came into the world in {value}", "was born and raised in {value}"],
        "dev": ["first saw the light of day in {value}", "is a native of {value}"],
        "test": ["was born in the town of {value}",
                 "spent the first years of life in {value}, where the family lived"]},
        "questions": {
        "train": ["Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"],
        "dev": ["Which town is {name} a native of?", "Where did {name} first see the light of day?"],
        "test": ["What city did {name} come from originally?", "Name the place where {name} was born."]}},
    "home_city": {"value": "city", "preds": {
        "train": ["lives in {value}", "has settled in {value}", "now makes a home in {value}"],
        "dev": ["currently resides in {value}", "rents a flat in {value}"],
        "test": ["moved to {value} a few years ago and stayed", "keeps a house in {value} today"]},
        "questions": {
        "train": ["Where does {name} live?", "In which city does {name} live now?", "What city is home to {name}?"],
        "dev": ["Where does {name} currently reside?", "In what city does {name} rent a flat?"],
        "test": ["Which city does {name} call home today?", "Where is the current home of {name}?"]}},
    "employer": {"value": "org", "preds": {
        "train": ["works for {value}", "is employed by {value}", "has a job at {value}"],
        "dev": ["draws a salary from {value}", "joined the staff of {value}"],
        "test": ["spends the working week at {value}", "is on the payroll of {value}"]},
        "questions": {
        "train": ["Who does {name} work for?", "Which company employs {name}?", "Where does {name} have a job?"],
        "dev": ["Which organisation pays the salary of {name}?", "Whose staff did {name} join?"],
        "test": ["At which company does {name} spend the working week?", "Who employs {name}?"]}},
    "profession": {"value": "profession", "preds": {
        "train": ["works as a {value}", "is a {value} by trade", "earns a living as a {value}"],
        "dev": ["trained to become a {value}", "has a career as a {value}"],
        "test": ["makes a living as a {value}", "holds a position as a {value}"]},
        "questions": {
        "train": ["What does {name} do for a living?", "What is the profession of {name}?", "What is {name}'s job?"],
        "dev": ["What did {name} train to become?", "Which career does {name} have?"],
        "test": ["What is {name}'s occupation?", "What kind of work does {name} do?"]}},
    "instrument": {"value": "instrument", "preds": {
        "train": ["plays the {value}", "practises the {value} every evening", "learned the {value} as a child"],
        "dev": ["performs on the {value} in a local orchestra", "owns and plays a {value}"],
        "test": ["took lessons on the {value} for many years", "is a talented {value} player"]},
        "questions": {
        "train": ["What instrument does {name} play?", "Which instrument does {name} practise?",
                  "What musical instrument did {name} learn?"],
        "dev": ["On which instrument does {name} perform?", "What instrument does {name} own and play?"],
        "test": ["Which musical instrument is {name} good at?", "What instrument did {name} take lessons on?"]}},
    "spouse": {"value": "person", "preds": {
        "train": ["is married to {value}", "married {value}", "shares a house with spouse {value}"],
        "dev": ["wed {value} in a small ceremony", "has a spouse named {value}"],
        "test": ["said yes when {value} proposed", "has been married to {value} for a long time"]},
        "questions": {
        "train": ["Who is {name} married to?", "Who is the spouse of {name}?", "Whom did {name} marry?"],
        "dev": ["Who did {name} wed?", "What is the name of {name}'s spouse?"],
        "test": ["Who is {name}'s husband or wife?", "To whom is {name} married?"]}},
    "object": {"value": "object", "preds": {
        "train": ["owns a {value}", "keeps a {value} on the desk", "treasures a {value}"],
        "dev": ["inherited a {value} from a grandparent", "carries a {value} everywhere"],
        "test": ["bought a {value} at a market", "was given a {value} as a gift"]},
        "questions": {
        "train": ["What does {name} own?", "What does {name} keep on the desk?", "What object does {name} treasure?"],
        "dev": ["What did {name} inherit from a grandparent?", "What does {name} carry everywhere?"],
        "test": ["What did {name} buy at a market?", "What was {name} given as a gift?"]}},
    "school": {"value": "school", "preds": {
        "train": ["studied at {value}", "graduated from {value}", "earned a degree at {value}"],
        "dev": ["attended {value}", "completed an education at {value}"],
        "test": ["spent student years at {value}", "holds a diploma from {value}"]},
        "questions": {
        "train": ["Where did {name} study?", "Which school did {name} graduate from?",
                  "Where did {name} earn a degree?"],
        "dev": ["Which institution did {name} attend?", "Where did {name} complete an education?"],
        "test": ["Where did {name} spend student years?", "Which school gave {name} a diploma?"]}},
}

#: numeric attributes: the entity kind they describe, the number kind, digit range (integers), phrasings per split
NUMBER_ATTRIBUTES: dict[str, dict] = {
    "founded": {"entity": "org", "kind": "year", "preds": {
        "train": ["was founded in {value}", "opened its doors in {value}", "has existed since {value}"],
        "dev": ["was established in {value}", "started trading in {value}"],
        "test": ["was set up in the year {value}", "traces its beginnings to {value}"]}, "questions": {
        "train": ["In what year was {name} founded?", "When did {name} open its doors?",
                  "Since which year has {name} existed?"],
        "dev": ["When was {name} established?", "In which year did {name} start trading?"],
        "test": ["What year was {name} set up?", "To which year does {name} trace its beginnings?"]}},
    "staff": {"entity": "org", "kind": "integer", "digits": (1, 6), "preds": {
        "train": ["employs {value} people", "has a workforce of {value}", "counts {value} employees"],
        "dev": ["pays {value} workers", "has {value} people on staff"],
        "test": ["gives work to {value} people", "lists {value} employees on its books"]}, "questions": {
        "train": ["How many people does {name} employ?", "How large is the workforce of {name}?",
                  "How many employees does {name} count?"],
        "dev": ["How many workers does {name} pay?", "How many people are on staff at {name}?"],
        "test": ["To how many people does {name} give work?", "How many employees are on the books of {name}?"]}},
    "revenue": {"entity": "org", "kind": "amount", "preds": {
        "train": ["reported revenue of {value} last year", "earned {value} in its latest year",
                  "had sales worth {value}"],
        "dev": ["booked {value} in annual sales", "took in {value} over the year"],
        "test": ["closed the year with a turnover of {value}", "brought in {value} according to its accounts"]},
        "questions": {
        "train": ["What revenue did {name} report last year?", "How much did {name} earn in its latest year?",
                  "What were the sales of {name} worth?"],
        "dev": ["How much did {name} book in annual sales?", "How much did {name} take in over the year?"],
        "test": ["What was the turnover of {name}?", "How much did {name} bring in according to its accounts?"]}},
    "registration": {"entity": "org", "kind": "integer", "digits": (1, 8), "preds": {
        "train": ["is listed under registration number {value}", "carries the registration number {value}",
                  "was registered as number {value}"],
        "dev": ["appears in the register as entry {value}", "holds licence number {value}"],
        "test": ["files its papers under reference {value}", "is recorded in the trade register with number {value}"]},
        "questions": {
        "train": ["What is the registration number of {name}?", "Under which registration number is {name} listed?",
                  "Which number was {name} registered as?"],
        "dev": ["Which register entry belongs to {name}?", "What licence number does {name} hold?"],
        "test": ["Under which reference does {name} file its papers?", "What is {name}'s trade register number?"]}},
    "product_code": {"entity": "org", "kind": "code", "preds": {
        "train": ["sells its best product under the code {value}", "ships its main model as {value}",
                  "labels its flagship item {value}"],
        "dev": ["catalogues its most popular product as {value}", "markets its lead item with code {value}"],
        "test": ["stamps its best seller with the code {value}", "gave its newest product the code {value}"]},
        "questions": {
        "train": ["What is the code of the best product of {name}?",
                  "Under which code does {name} ship its main model?",
                  "How does {name} label its flagship item?"],
        "dev": ["What catalogue code does {name} use for its most popular product?",
                "Which code does {name} market its lead item with?"],
        "test": ["Which code is stamped on the best seller of {name}?",
                 "What code did {name} give its newest product?"]}},
    "birth_year": {"entity": "person", "kind": "year", "preds": {
        "train": ["was born in the year {value}", "celebrated a first birthday a year after {value}",
                  "arrived in {value}, the year of birth"],
        "dev": ["has {value} as birth year", "was born back in {value}"],
        "test": ["has a birth certificate dated {value}", "came into this world in the year {value}"]}, "questions": {
        "train": ["In what year was {name} born?", "What is the birth year of {name}?", "When was {name} born?"],
        "dev": ["Which year is {name}'s birth year?", "Back in which year was {name} born?"],
        "test": ["What year is on {name}'s birth certificate?", "In which year did {name} come into this world?"]}},
    "house_number": {"entity": "person", "kind": "integer", "digits": (1, 4), "preds": {
        "train": ["lives at house number {value}", "has the door number {value}", "gets mail at number {value}"],
        "dev": ["resides at number {value} on the street", "painted the number {value} on the front door"],
        "test": ["moved into the house numbered {value}", "can be found at door {value}"]}, "questions": {
        "train": ["At which house number does {name} live?", "What is {name}'s door number?",
                  "At what number does {name} get mail?"],
        "dev": ["At which number on the street does {name} reside?", "Which number is on {name}'s front door?"],
        "test": ["What is the number of the house {name} moved into?", "At which door can {name} be found?"]}},
    "member_id": {"entity": "person", "kind": "integer", "digits": (1, 8), "preds": {
        "train": ["holds membership number {value}", "has the library card number {value}",
                  "was given member number {value}"],
        "dev": ["signs in with account number {value}", "uses the customer number {value}"],
        "test": ["is enrolled under the identifier {value}", "shows the pass number {value} at the gate"]},
        "questions": {
        "train": ["What is the membership number of {name}?", "What library card number does {name} have?",
                  "Which member number was {name} given?"],
        "dev": ["Which account number does {name} sign in with?", "What customer number does {name} use?"],
        "test": ["Under which identifier is {name} enrolled?", "What pass number does {name} show at the gate?"]}},
    "savings": {"entity": "person", "kind": "amount", "preds": {
        "train": ["has savings of {value}", "put aside {value} last year", "keeps {value} in the bank"],
        "dev": ["inherited a sum of {value}", "won {value} in a contest"],
        "test": ["paid {value} for a used car", "donated {value} to a local charity"]}, "questions": {
        "train": ["How much has {name} saved?", "How much did {name} put aside last year?",
                  "How much does {name} keep in the bank?"],
        "dev": ["How much did {name} inherit?", "How much did {name} win in a contest?"],
        "test": ["How much did {name} pay for a used car?", "How much did {name} donate to a local charity?"]}},
    "locker_code": {"entity": "person", "kind": "code", "preds": {  # one thing per split: every phrasing and
        "train": ["uses the locker code {value}", "opens the locker with the code {value}",  # question names it
                  "was given the locker code {value}"],
        "dev": ["was issued the parking permit {value}", "holds the parking permit {value}"],
        "test": ["checked in with the luggage tag {value}", "had the luggage tag {value} on the suitcase"]},
        "questions": {
        "train": ["What locker code does {name} use?", "Which code opens {name}'s locker?",
                  "What is {name}'s locker code?"],
        "dev": ["Which parking permit was {name} issued?", "What is the number of {name}'s parking permit?"],
        "test": ["What luggage tag did {name} check in with?", "Which luggage tag was on {name}'s suitcase?"]}},
}

#: sentence openers (empty = none) and document frames (intro, outro) per split
OPENERS = {"train": ["", "", "", "As it happens, ", "Friends say that ", "It is well known that "],
           "dev": ["", "", "", "By all accounts, ", "Neighbours report that "],
           "test": ["", "", "", "Apparently, ", "The records show that "]}
FRAMES = {
    "train": [("biography", "{name}: a short biography.", ""),
              ("news", "Neighbourhood news. A profile of {name} appeared in this week's edition.",
               "The editors thank everyone who contributed."),
              ("letter", "Dear {reader},\n\nYou asked me to write down what I know about {name}.",
               "With best wishes,\n{writer}"),
              ("wiki", "{name}\n\nThis article describes {name}.", "See also: list of notable residents."),
              ("plain", "", "")],
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
    "train": [(["The special magic number is {n}.", "Remember that the special magic number is {n}."],
               ["What is the special magic number?", "Which number is the special magic number?"]),
              (["The secret code is {n}.", "Write down the secret code: {n}."],
               ["What is the secret code?", "Which code is the secret one?"]),
              (["My lucky number happens to be {n}.", "Today the lucky number is {n}."],
               ["What is the lucky number?", "Which number is lucky?"]),
              (["The parcel was sent with tracking number {n}."],
               ["What is the tracking number of the parcel?", "Which tracking number was the parcel sent with?"])],
    "dev": [(["The access code for the side door is {n}.", "To enter by the side door, type {n}."],
             ["What is the access code for the side door?", "Which code opens the side door?"]),
            (["Hidden somewhere in this text is the number {n}."],
             ["What number is hidden in the text?", "Which number was hidden in this text?"])],
    "test": [(["The combination of the blue locker is {n}.", "To open the blue locker, dial {n}."],
              ["What is the combination of the blue locker?", "Which combination opens the blue locker?"]),
             (["The wifi password for guests is {n}."],
              ["What is the wifi password for guests?", "Which password do guests use for the wifi?"])],
}

#: general-knowledge questions with a fixed short answer, per split (the document never holds the answer)
GENERAL_QUESTIONS = {
    "train": [("What is the capital of France?", "Paris"), ("How many days are there in a week?", "Seven"),
              ("What colour is the sky on a clear day?", "Blue"), ("What do bees make?", "Honey"),
              ("What is the largest planet in the solar system?", "Jupiter"), ("What is the opposite of hot?", "Cold"),
              ("What is frozen water called?", "Ice"), ("Which animal says moo?", "A cow"),
              ("What is the capital of Germany?", "Berlin"), ("How many legs does a spider have?", "Eight"),
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
              "Give me one tip for sleeping better.", "What is a good name for a goldfish?",
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

__all__ = ["CHITCHAT_QUESTIONS", "CURRENCIES", "FRAMES", "GENERAL_QUESTIONS", "INSTRUMENTS", "NEEDLES", "NOT_STATED",
           "NUMBER_ATTRIBUTES", "OBJECTS", "OPENERS", "ORG_SUFFIXES", "PERSON_ATTRIBUTES", "PROFESSIONS",
           "SCHOOL_FORMS"]
