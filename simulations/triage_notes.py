"""Synthetic emergency-department triage notes (note text -> department).

This is the built-in default dataset for the fedlora demo: a stand-in for real
hospital triage notes, which are private and cannot be shipped, so the demo runs
with no download. Notes are generated deterministically from a seed using only
the standard library. They are built to be learnable from the text but not
trivially by one keyword: symptoms are shared across departments, notes negate
other departments' symptoms ("denies chest pain"), and a few words carry typos.
Labels are always the department the chief complaint belongs to (no label noise).
"""

from __future__ import annotations

import random
import re

DEPARTMENTS: tuple[str, ...] = (
    "cardiology",
    "neurology",
    "orthopedics",
    "gastroenterology",
    "pulmonology",
    "dermatology",
)

# Per department: specific chief complaints, associated findings, history and
# the terms *other* departments' notes may deny (so keywords become ambiguous).
_SPEC: dict[str, dict[str, list[str]]] = {
    "cardiology": {
        "cc": ["chest pain", "chest tightness", "palpitations", "substernal pressure",
               "CP radiating to L arm", "SOB on exertion w/ edema", "crushing chest pain",
               "chest heaviness", "racing heart", "heart fluttering", "irregular heartbeat",
               "pressure-like CP", "exertional chest discomfort",
               "worsening leg swelling and orthopnea"],
        "assoc": ["diaphoresis", "radiation to jaw", "L arm heaviness", "orthopnea", "PND",
                  "bilateral pedal edema", "3-pillow orthopnea", "pain worse w/ exertion",
                  "relieved by rest", "10 lb weight gain", "pounding heartbeat"],
        "hx": ["CAD", "hx of MI", "s/p CABG", "afib on apixaban", "CHF", "HFrEF",
               "hx of stents", "PCI 2019", "HLD", "aortic stenosis"],
        "neg": ["chest pain", "CP", "palpitations", "chest pressure", "leg swelling"],
    },
    "neurology": {
        "cc": ["headache", "worst headache of life", "R-sided weakness", "L facial droop",
               "slurred speech", "new onset seizure", "numbness L hand", "tingling in both feet",
               "vertigo", "blurry vision", "acute confusion", "word-finding difficulty",
               "migraine w/ aura", "thunderclap HA", "unsteady gait", "double vision"],
        "assoc": ["photophobia", "neck stiffness", "aphasia", "facial droop", "arm drift",
                  "postictal confusion", "tongue biting", "visual aura", "ataxia",
                  "paresthesias", "nystagmus", "room spinning"],
        "hx": ["hx of migraines", "epilepsy on keppra", "prior CVA", "hx of TIA", "MS",
               "Parkinson's", "hx of aneurysm"],
        "neg": ["headache", "LOC", "focal weakness", "numbness", "vision changes",
                "slurred speech", "HA"],
    },
    "orthopedics": {
        "cc": ["R knee pain after fall", "L ankle swelling after twisting injury",
               "wrist pain s/p FOOSH", "hip pain, unable to bear weight", "shoulder pain after MVC",
               "deformity of L forearm", "R knee effusion", "ankle injury playing soccer",
               "suspected fx R wrist", "shoulder dislocation", "painful swollen knee",
               "thumb injury", "ankle sprain", "L hip pain after mechanical fall"],
        "assoc": ["limited ROM", "point tenderness", "visible deformity", "bruising over joint",
                  "pain w/ weight bearing", "distal pulses intact", "cap refill <2s",
                  "heard a pop", "EMS splint in place", "shortened externally rotated leg"],
        "hx": ["osteoporosis", "hx of ACL repair", "s/p R TKA", "OA", "RA", "gout",
               "prior hip fx"],
        "neg": ["trauma", "falls", "joint pain", "injury", "deformity"],
    },
    "gastroenterology": {
        "cc": ["abdominal pain", "RLQ pain", "epigastric pain", "N/V x multiple episodes",
               "bloody diarrhea", "coffee ground emesis", "melena", "BRBPR",
               "RUQ pain after fatty meal", "abd distension", "dysphagia", "jaundice",
               "diffuse abd pain", "hematemesis", "intractable vomiting", "cramping abd pain"],
        "assoc": ["anorexia", "loose stools", "black tarry stools", "tenderness RLQ", "guarding",
                  "rebound tenderness", "+ Murphy sign", "unable to tolerate PO", "bloating",
                  "acid reflux", "scleral icterus", "dark urine"],
        "hx": ["GERD", "hx of pancreatitis", "cirrhosis", "Crohn's", "UC", "PUD",
               "s/p cholecystectomy", "EtOH use", "hx of GI bleed", "daily NSAID use"],
        "neg": ["abd pain", "abdominal pain", "N/V", "vomiting", "diarrhea", "melena",
                "blood in stool"],
    },
    "pulmonology": {
        "cc": ["productive cough", "wheezing", "cough w/ green sputum", "hemoptysis",
               "COPD exacerbation", "asthma flare", "pleuritic chest pain", "worsening dyspnea",
               "persistent cough", "difficulty breathing", "tight chest w/ wheezing",
               "increased O2 requirement"],
        "assoc": ["chills", "sputum production", "using accessory muscles", "diffuse wheezes",
                  "crackles at R base", "speaking in short sentences", "night sweats",
                  "using rescue inhaler q2h", "pleuritic pain", "barrel chest"],
        "hx": ["COPD on 2L home O2", "asthma", "hx of PE", "OSA on CPAP", "ILD",
               "hx of pneumonia", "former smoker 40 pk-yr"],
        "neg": ["cough", "wheezing", "SOB", "sputum", "hemoptysis"],
    },
    "dermatology": {
        "cc": ["rash", "itchy rash on arms", "spreading redness L leg", "blistering rash",
               "hives", "painful skin lesion", "abscess R axilla", "vesicular rash along dermatome",
               "burn to R hand", "swollen red lower leg", "changing mole", "peeling skin",
               "facial swelling and hives", "pruritic papules", "nonhealing ulcer on foot"],
        "assoc": ["pruritus", "warmth and erythema", "drainage from wound", "target lesions",
                  "margins marked", "new detergent", "recent abx", "fluctuance", "crusting",
                  "burning sensation", "honey-colored crust"],
        "hx": ["eczema", "psoriasis", "hx of MRSA", "hx of melanoma", "hx of shingles",
               "contact dermatitis", "IVDU"],
        "neg": ["rash", "skin changes", "itching", "hives", "lesions"],
    },
}

# Symptoms that genuinely occur in several departments; with one of these as the
# chief complaint only the associated findings / history identify the department.
_SHARED: dict[str, list[str]] = {
    "cardiology": ["shortness of breath", "SOB", "dizziness", "syncope", "fatigue", "nausea",
                   "leg swelling"],
    "neurology": ["dizziness", "syncope", "nausea", "vomiting", "neck pain", "fatigue"],
    "orthopedics": ["back pain", "low back pain", "neck pain", "leg swelling"],
    "gastroenterology": ["nausea", "vomiting", "back pain", "fever and chills", "fatigue"],
    "pulmonology": ["shortness of breath", "SOB", "dyspnea", "fever and chills", "fatigue",
                    "chest pain"],
    "dermatology": ["fever and chills", "leg swelling", "swelling"],
}

# Common comorbidities that say nothing about the department (realistic noise).
_GENERIC_HX = ["HTN", "DM2", "HLD", "obesity", "anxiety", "CKD3", "hypothyroid", "smoker"]
_GENERIC_NEG = ["fever", "recent travel", "sick contacts"]
_FILLER = ["arrived via EMS", "ambulatory to triage", "ESI 3", "ESI 2", "A&Ox3", "NAD",
           "tylenol PTA w/o relief", "GCS 15", "NKDA", "sent by PCP", "wife at bedside"]
_AGE_RANGE = {"cardiology": (38, 92), "neurology": (18, 90), "orthopedics": (16, 90),
              "gastroenterology": (18, 86), "pulmonology": (18, 90), "dermatology": (16, 82)}

# A denial is contradictory if the note already mentions any of these cues.
_IMPLIED_BY: dict[str, tuple[str, ...]] = {
    "sob": ("breath", "dyspnea"), "cp": ("chest",), "chest pain": ("chest",),
    "chest pressure": ("chest",), "n/v": ("nausea", "vomit", "emesis"),
    "vomiting": ("emesis", "n/v"), "leg swelling": ("swell", "swollen", "edema"),
    "numbness": ("tingling", "paresthesia"), "itching": ("itchy", "prurit"),
    "blood in stool": ("melena", "brbpr", "bloody"), "falls": ("fall",),
    "trauma": ("burn", "injury", "mvc"),
}
# Synonyms, so one note never denies the same symptom twice ("denies headache, HA").
_CANON = {"CP": "chest pain", "chest pressure": "chest pain", "HA": "headache",
          "abd pain": "abdominal pain", "N/V": "vomiting", "melena": "blood in stool"}

_MIN_WORDS, _MAX_WORDS = 12, 40
_TYPO_RATE = 0.16  # per eligible word; ~1/3 of words are eligible -> ~5% of all words


def _demographics(rng: random.Random, dept: str) -> str:
    age = rng.randint(*_AGE_RANGE[dept])
    male = rng.random() < 0.5
    s, word, person = ("M", "male", "man") if male else ("F", "female", "woman")
    fmt = rng.choice(["{a}yo {s}", "{a} y/o {w}", "pt {a}{s}", "{a}{s}", "{a} yo {w}",
                      "{a}-year-old {p}", "{s} {a}", "{a} y.o. {s}"])
    return fmt.format(a=age, s=s, w=word, p=person)


def _onset(rng: random.Random) -> str:
    n = rng.randint(1, 14)
    return rng.choice([f"x{n} days", f"x {n}d", "since this morning", f"for {n} wks",
                       f"started {n}h ago", "since last night", f"sudden onset {n * 5} min PTA",
                       f"gradual onset over {n} days", f"intermittent x{n} wks",
                       "woke up with sx", "x1 day", f"for {n} days"])


def _vitals(rng: random.Random, dept: str) -> tuple[str, bool]:
    # Department-shaped but overlapping ranges: vitals are a weak, realistic cue.
    sbp = rng.randint(100, 160) + (rng.randint(0, 35) if dept in ("cardiology", "neurology") else 0)
    dbp = int(sbp * rng.uniform(0.55, 0.68))
    hr = rng.randint(55, 150) if dept == "cardiology" else rng.randint(60, 110)
    spo2 = rng.randint(85, 97) if dept == "pulmonology" else rng.randint(93, 100)
    fever_p = {"pulmonology": 0.4, "dermatology": 0.3, "gastroenterology": 0.15}.get(dept, 0.05)
    febrile = rng.random() < fever_p
    temp = round(rng.uniform(38.0, 39.8) if febrile else rng.uniform(36.3, 37.6), 1)
    rr = rng.randint(18, 30) if dept == "pulmonology" else rng.randint(12, 22)
    items = [f"BP {sbp}/{dbp}", f"HR {hr}",
             rng.choice([f"SpO2 {spo2}% RA", f"O2 sat {spo2}%", f"sat {spo2}% on RA"]),
             rng.choice([f"T {temp}C", f"temp {temp}", f"T {temp}"]), f"RR {rr}"]
    keep = sorted(rng.sample(range(len(items)), rng.randint(2, 5)))
    sep = rng.choice([" ", ", ", " "])
    text = rng.choice(["", "VS: ", "vitals ", "Vitals: "]) + sep.join(items[i] for i in keep)
    return text, febrile and 3 in keep


def _negations(rng: random.Random, dept: str, present: str) -> str | None:
    # Deny symptoms of other departments, never something the note itself reports.
    present = present.lower()
    pool = [t for d in DEPARTMENTS if d != dept for t in _SPEC[d]["neg"]] + _GENERIC_NEG
    pool = [t for t in pool
            if not any(c in present for c in (t.lower(), *_IMPLIED_BY.get(t.lower(), ())))]
    rng.shuffle(pool)
    terms: list[str] = []
    for t in pool:
        if _CANON.get(t, t) not in {_CANON.get(c, c) for c in terms}:
            terms.append(t)
    terms = terms[: rng.choice([1, 1, 2, 2, 3])]
    if not terms:
        return None
    if len(terms) == 1:
        return rng.choice(["denies {}", "no {}", "neg for {}", "pt denies {}"]).format(terms[0])
    joined = rng.choice([", ", "/", " or "]).join(terms)
    return rng.choice(["denies {}", "no {}", "neg for {}", "pt denies {}"]).format(joined)


def _build_note(rng: random.Random, dept: str) -> str:
    spec = _SPEC[dept]
    shared = rng.random() < 0.3
    cc = rng.choice(_SHARED[dept] if shared else spec["cc"])
    lead = rng.choice(["c/o {}", "presents w/ {}", "CC: {}", "{}", "reports {}", "here for {}",
                       "complains of {}", "BIBA for {}", "walk-in w/ {}"]).format(cc)
    head = f"{lead} {_onset(rng)}" if rng.random() < 0.9 else lead
    demo = _demographics(rng, dept)
    first = f"{demo} {head}" if rng.random() < 0.8 else f"{head}, {demo}"

    # Optional parts, tagged so the length trim below can drop them by kind.
    optional: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        optional.append(("filler", rng.choice(_FILLER)))
    if rng.random() < 0.6:
        hx = rng.sample(spec["hx"], rng.randint(0, 2)) + rng.sample(_GENERIC_HX, rng.randint(0, 2))
        if hx:
            rng.shuffle(hx)
            prefix = rng.choice(["PMH: {}", "hx {}", "h/o {}", "PMHx {}", "PMH {}"])
            if not prefix.startswith("PMH"):  # avoid "hx hx of MI"
                hx = [h.replace("hx of ", "") for h in hx]
            optional.append(("hx", prefix.format(", ".join(hx))))
    # Shared complaints always get a department-specific finding so the label stays recoverable.
    if shared or rng.random() < 0.6:
        fresh = [x for x in spec["assoc"] if x not in cc]  # no "fever and chills ... + chills"
        a = rng.sample(fresh, rng.randint(1, 2))
        optional.append(("assoc", rng.choice(["+ {}", "assoc w/ {}", "also {}", "w/ {}", "{}"])
                         .format(" and ".join(a))))
    vitals, febrile = _vitals(rng, dept)
    present = " ".join([first, *(p for _, p in optional), "fever" if febrile else ""])
    if rng.random() < 0.75:
        neg = _negations(rng, dept, present)
        if neg:
            optional.append(("neg", neg))

    sep = rng.choice([". ", "; ", ", ", " - ", ". "])
    order_seed = rng.getrandbits(32)

    def assemble(opts: list[tuple[str, str]]) -> str:
        body = [p for _, p in opts] + [vitals]
        # Same shuffle seed on every call, so trimming removes parts without reordering.
        order = random.Random(order_seed).sample(body, len(body))
        return sep.join([first] + order)

    note = assemble(optional)
    for kind in ("filler", "hx", "neg"):  # trim, keeping complaint, findings, vitals
        if len(note.split()) <= _MAX_WORDS:
            break
        optional = [o for o in optional if o[0] != kind]
        note = assemble(optional)
    while len(note.split()) < _MIN_WORDS:
        optional.append(("filler", rng.choice(_FILLER)))
        note = assemble(optional)

    # Varied casing and final punctuation, as different triage nurses write.
    style = rng.random()
    if style < 0.15:
        note = note.lower()
    elif style < 0.2:
        note = note.replace(cc, cc.upper(), 1)
    elif sep == ". ":
        note = note[0].upper() + note[1:]
    return note + rng.choice([".", "", "."])


_WORD = re.compile(r"^([A-Za-z]+)([^A-Za-z]*)$")


def _typo(rng: random.Random, word: str) -> str:
    """Swap, drop or double one inner character (e.g. 'pain' -> 'pian')."""
    i = rng.randint(1, len(word) - 2)
    kind = rng.choice(("swap", "swap", "drop", "double"))
    if kind == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1:]


def _add_typos(rng: random.Random, note: str, rate: float) -> str:
    out = []
    for tok in note.split(" "):
        m = _WORD.match(tok)
        # Only plain lowercase-ish words >= 4 letters; abbreviations/numbers stay intact.
        if m and len(m.group(1)) >= 4 and not m.group(1).isupper() and rng.random() < rate:
            tok = _typo(rng, m.group(1)) + m.group(2)
        out.append(tok)
    return " ".join(out)


def _generate(n: int, seed: int, typo_rate: float) -> list[dict[str, str]]:
    rng = random.Random(seed)
    # Typos use their own stream so the clean text is identical for any typo_rate.
    typo_rng = random.Random(seed * 1_000_003 + 17)
    # Exactly balanced labels (up to n mod k), shuffled.
    labels = [DEPARTMENTS[i % len(DEPARTMENTS)] for i in range(n)]
    rng.shuffle(labels)
    return [{"text": _add_typos(typo_rng, _build_note(rng, d), typo_rate), "label": d}
            for d in labels]


def generate_notes(n: int = 3000, seed: int = 0) -> list[dict[str, str]]:
    """Each item: {"text": note, "label": department}. Same (n, seed) -> identical list.

    Labels are balanced across DEPARTMENTS; ~5% of words carry a typo.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    return _generate(n, seed, _TYPO_RATE)
