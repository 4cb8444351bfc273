"""Reading a free-text referring expression into a query that lesion candidates can be checked against.

``read_query(text)`` takes one sentence (``str``), e.g. ``"of the cysts in the right lobe, the biggest one"``,
``"is there a 2-cm met in S7?"`` or ``"the splenic cyst"``, and returns a :class:`ReadQuery` (frozen dataclass,
``to_dict()`` JSON-ready):

- ``organ``: ``"liver"`` when the sentence is about the liver or names no organ (a lesion sentence without an
  organ is about the liver: the model segments liver lesions), else the other organ named (``"spleen"``,
  ``"kidney"``, ``"lung"``, ``"bone"``, ...; :data:`ORGANS`). **Organ rule**: the organ is the one the lesion is
  IN or OF ("the renal cyst", "a nodule in the right lung", "bone metastasis in L2"), never one it is only
  described by: an organ named after a relation word ("near", "adjacent to", "abutting", "posterior to", "from",
  ...; :data:`NEIGHBOUR_CUES`), a liver landmark named after an organ ("gallbladder fossa", "renal impression")
  or the origin of a metastasis ("colorectal metastasis", "a met from breast cancer") is a neighbour; a named
  liver wins over any other organ; with no organ left, the liver.
- ``query``: a :class:`custom.data.expressions.Query` (select, lobe, segment 2-8, kind, density, diameter_cm).
  Lobe and segment are liver anatomy and are read only when the organ is the liver.
- what a ``Query`` cannot hold yet: ``extra_select`` ("brightest" / "darkest"; ``query.select`` then stays
  "only"), ``ordinal`` ("the second largest" -> 2 with select "largest"), ``count`` ("both", "the three cysts",
  "the two largest"), ``diameter_mm`` (the stated size, exact) and ``size_compare`` (">" / "<" for "larger than
  2 cm", "sub-centimetre"; ``query.diameter_cm`` is then None), ``excluded`` (the filters a negation applies to:
  "not in the right lobe" -> ``{"lobe": "right"}``, "other than the cyst" -> ``{"kind": "cyst"}``), ``negated``,
  ``question`` (a yes/no question about presence: "is there ...", "any ...?"), ``lesion_word`` (a lesion or
  abnormality word was read) and ``unread`` (phrases that look like attributes but fit no field, e.g.
  "calcified", "abutting the gallbladder": the record can say the sentence was not read fully). ``notes`` say
  what was simplified (segment 1 / caudate, several segments, a corrected typo).

Conventions: a size is ``diameter_mm`` as stated and ``diameter_cm`` = mm / 10 rounded half up ("15 mm" -> 2; the
largest of "4 x 3 cm"); "3 cm from the dome" is a distance, reported unread. A number right after a lesion noun is
a label ("lesion 3"), reported unread; "the larger of the two cysts" picks from two (count None) while "the two
largest cysts" asks for two (count 2); "segment two lesions" at the start of a sentence is the command. Several
segments ("segments 6 and 7", "S5/6") keep only their common lobe. "right lobe" is the liver's right lobe while
"rightmost", "furthest to the (patient's) right", "the one on the right" select the rightmost lesion (patient
frame). A neighbour organ, a landmark ("porta hepatis") or a lesion type a Query cannot hold ("haemangioma") is
reported in ``unread``. Known limits: a liver adjective makes the liver win ("the hepatic lymph node" reads liver);
a negation covers only the attribute right after it.

How it reads: the sentence is lower-cased and normalised, then tables of phrases (regular expressions) are
applied in a fixed order, each match claiming its words so that a later, shorter phrase cannot read them again
("right under the dome" is the dome, not the right lobe; "right upper lobe" is the lung, not "upper"; "lowest
attenuation" is darkest, not lowest). Unclaimed words that are not filler become ``unread``; an unread word of six
letters or more that is a close match (``difflib``, ratio >= 0.85) of a known word is corrected and the sentence
read again. Without a superlative, a plural lesion noun, "all", "every", "each", "both" or a count make the
selector "all", otherwise it is "only". The reader is deterministic and needs no model.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from custom.data.expressions import SELECTORS, Query

__all__ = ["READ_SELECTORS", "ORGANS", "NEIGHBOUR_CUES", "ReadQuery", "read_query"]

#: Selectors of the reader: the Query's plus the brightness ones, which go to ``ReadQuery.extra_select``.
READ_SELECTORS = (*SELECTORS, "brightest", "darkest")
LEFT_SEGMENTS = (2, 3, 4)  # Couinaud segments left of Cantlie's line (custom.data.geometry.REGION_CONDITIONS)
NUMBERS = {w: i for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)}
NUMBERS.update({"eleven": 11, "twelve": 12})
ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7, "viii": 8}
ORDINALS = {w: i for i, w in enumerate("first second third fourth fifth sixth seventh eighth".split(), 1)}
ORDINALS.update({f"{i}{s}": i for i, s in zip(range(1, 9), ("st", "nd", "rd", "th", "th", "th", "th", "th"))})


def _rx(*sources: str, loose: bool = True, after: str = "") -> re.Pattern:
    """Alternation of phrases as one word-bounded pattern; with ``loose``, a space in a phrase stands for spaces
    or hyphens and a hyphen for an optional space or hyphen ("hypo-dense" reads hypodense, hypo-dense, hypo dense).
    Phrases must not use '-' or ' ' inside regex constructs such as character classes."""
    if loose:
        sources = tuple(s.replace("-", "[\\s-]?").replace(" ", "[\\s-]+") for s in sources)
    return re.compile(r"(?<![\w'])(?:" + "|".join(sources) + r")(?![\w])" + after)


# ---------------------------------------------------------------------------------------------- phrase tables
# Each table is read in the order of _scan; a phrase is a regular expression (see _rx for spaces and hyphens).
SIDE = "(right|left)"
NOT_RELATION = r"(?![\s-]+to\b)"  # "posterior to the cyst" is a relation, not a selector
DOME = _rx(
    "(?:right )?(?:just )?(?:closest|nearest|next|close|near|nearer|closer|adjacent|abutting|under|beneath|below"
    "|at|by|against|touching)(?: to)? (?:the )?(?:liver |hepatic )?(?:dome|(?:hemi-)?diaphragm)(?: of (?:the )?liver)?",
    "(?:most )?sub-diaphragmatic(?:-most)?|(?:liver |hepatic )?dome",
)
SECTORS = (
    ("lobe", "left", _rx("left lateral (?:segments?|sections?|sectors?)")),
    ("segment", 4, _rx("left medial (?:segments?|sections?|sectors?)|quadrate(?: lobe)?")),
    ("segment", 1, _rx("caudate(?: lobe)?")),
    ("lobe", "right", _rx("right (?:anterior|posterior) (?:segments?|sections?|sectors?)")),
    ("lobe", "right", _rx("(?:anterior|posterior) (?:sections?|sectors?) of (?:the )?right (?:hepatic |liver )?lobe")),
)
_SEG_NUMBER = (
    r"(?:[12345678]|viii|vii|vi|iv|v|iii|ii|i|one|two|three|four|five|six|seven|eight)[ab]?(?!\s*-?\s*(?:cm|mm))"
)
_SEG_WORD = r"(?:couinaud |hepatic |liver )?(?:segments?|segs?|sgmts?)|couinaud"
_SEG_JOIN = r"\s*(?:,|and|&|/|-|to|or)\s*"
SEGMENTS = re.compile(
    rf"(?<![\w'])(?:(?:{_SEG_WORD})\s*[#-]?\s*{_SEG_NUMBER}(?:{_SEG_JOIN}(?:(?:{_SEG_WORD})\s*)?{_SEG_NUMBER})*"
    rf"|s[\s-]?[12345678][ab]?(?:{_SEG_JOIN}s?-?[12345678][ab]?)*"
    rf"|(?:{'|'.join(ORDINALS)})[\s-]+(?:couinaud |hepatic |liver )?segment)(?![\w])"
)
LOBES = _rx(
    f"{SIDE} (?:hepatic |liver )?lob(?:e|es|ar)|{SIDE} hemi-livers?|{SIDE} (?:half|side|part|portion|aspect) of "
    f"(?:the )?liver|{SIDE} livers?|{SIDE} hepatic(?![\\s-]+(?:veins?|artery|arteries|ducts?|flexure))|(r|rt|l|lt) lobe"
)
#: "the posterior right lobe": the position word says where in the lobe, which no field holds (it is not a selector).
POSITION_IN_LOBE = _rx(
    f"(?:anterior|posterior|superior|inferior|upper|lower)(?=\\s+{SIDE}\\s+(?:hepatic |liver )?lobe)"
)
WEAK_LOBES = _rx(f"{SIDE}-sided|{SIDE}-side")

_NUM = r"(?:\d+(?:\.\d+)?|one|two|three|four|five|six|seven|eight|nine|ten)"
_UNIT = r"(?:cm|mm|cms|centimet(?:er|re)s?|millimet(?:er|re)s?)"
_SIZE = rf"{_NUM}(?:\s*(?:x|by)\s*{_NUM}){{0,2}}\s*(?:-\s*)?{_UNIT}"
_MORE, _LESS = "larger|bigger|greater|wider|longer|more|above|over", "smaller|less|shorter|narrower|below|under"
SIZES = (
    (
        ">",
        _rx(
            rf"(?:(?:{_MORE}) than|over|above|exceeding|at least|>=?)\s*{_SIZE}|{_SIZE}\s+(?:or|and) (?:{_MORE})",
            loose=False,
        ),
    ),
    (
        "<",
        _rx(
            rf"(?:(?:{_LESS}) than|under|below|up to|at most|<=?)\s*{_SIZE}|{_SIZE}\s+(?:or|and) (?:{_LESS})",
            loose=False,
        ),
    ),
    ("<", _rx("sub-centimet(?:er|re)|sub-cm")),
    ("distance", _rx(rf"{_SIZE}\s+(?:from|away|below|above|beneath|under|deep|beyond)", loose=False)),
    (None, _rx(_SIZE, loose=False)),
)
#: "(?<!\\x2d)most": not the end of "right-most" ("the right-most hypodense lesion" is not the darkest).
BRIGHTNESS = (
    (
        "brightest",
        _rx(
            "brightest|densest|brighter|denser|(?<!\\x2d)most (?:hyper-dense|hyper-attenuating|hyper-enhancing"
            "|dense|attenuating|enhancing|avidly enhancing)|(?:highest|higher) (?:attenuation|density|hu)"
            "|more (?:hyper-dense|dense|hyper-attenuating)|least (?:hypo-dense|dark|hypo-attenuating)"
        ),
    ),
    (
        "darkest",
        _rx(
            "darkest|darker|(?<!\\x2d)most (?:hypo-dense|hypo-attenuating|hypo-enhancing|dark)|(?:lowest|lower) "
            "(?:attenuation|density|hu)|more (?:hypo-dense|hypo-attenuating)|least (?:dense|attenuating"
            "|enhancing|bright|hyper-dense)"
        ),
    ),
)
KINDS = (
    ("metastasis", _rx("metastatic deposits?|metastas[ie]s|metastatic|mets?|secondar(?:y|ies)|deposits?")),
    ("cyst", _rx("cysts?|cystic|fluid-filled|fluid-density|water-density")),
    (
        "tumour",
        _rx(
            "tumou?rs?|mass(?:es)?|neoplasms?|neoplastic|solid|hccs?|hepatomas?|(?:hepatocellular "
            "|cholangio)?carcinomas?|cancers?|growths?|lumps?"
        ),
    ),
)
ADJECTIVES = {"metastatic", "cystic", "neoplastic", "solid", "filled", "density"}
DENSITIES = (  # (value, pattern, the phrase is a noun)
    ("hypodense", _rx("hypo-densit(?:y|ies)|hypo-attenuations?"), True),
    ("hyperdense", _rx("hyper-densit(?:y|ies)|hyper-attenuations?"), True),
    (
        "hypodense",
        _rx(
            "hypo-dense|hypo-attenuat(?:ing|ed)|hypo-enhancing|hypo-intense|hypo-vascular"
            "|(?:of )?low-(?:attenuation|density|attenuating)|dark|lucent"
        ),
        False,
    ),
    (
        "hyperdense",
        _rx(
            "hyper-dense|hyper-attenuat(?:ing|ed)|hyper-enhancing|hyper-intense|hyper-vascular"
            "|(?:of )?high-(?:attenuation|density|attenuating)|bright|dense|(?:avidly|brightly) enhancing"
        ),
        False,
    ),
)
NOUNS = _rx(
    "lesions?|nodules?|foci|focus|abnormalit(?:y|ies)|findings?|spots?|areas?|lucenc(?:y|ies)"
    "|opacit(?:y|ies)|densit(?:y|ies)|polyps?"
)
PRONOUNS = _rx("ones?")
#: Lesion types a Query cannot hold: read as lesion words and reported unread.
UNPLACED = _rx(
    "h(?:a)?emangiomas?|abscess(?:es)?|fnh|adenomas?|granulomas?|calcifications?|h(?:a)?ematomas?|bilomas?|infarcts?"
)


def _organ(*sources: str) -> re.Pattern:
    """An organ's words, which may follow its side ("the right femur", "left adrenal")."""
    return _rx("(?:(?:right|left|bilateral) )?(?:" + "|".join(sources) + ")")


#: Organ -> its nouns and adjectives; "liver" must come first.
ORGANS = (
    ("liver", _rx("livers?|hepatic|hepatis|intra-hepatic|hepato\\w*|hemi-liver")),
    ("adrenal", _organ("adrenals?|adrenal glands?|supra-renal")),
    ("kidney", _organ("kidneys?|renal|nephric")),
    ("spleen", _organ("spleens?|splenic|splenule")),
    (
        "bone",
        _organ(
            "bones?|osseous|skeletal|skeleton|vertebrae?|vertebral(?: bod(?:y|ies))?|spine|spinal|sacrum|sacral"
            "|ribs?|iliac|femur|femoral|humerus|humeral|sternum|sternal|scapula|skull|pelvic bones?"
            "|[ctl]\\d{1,2}(?: vertebrae?)?|(?:thoracic|lumbar|cervical) (?:spine|vertebrae?)|lumbar"
        ),
    ),
    (
        "lung",
        _organ("lungs?|pulmonary|pleura|pleural|(?:upper|middle|lower) lobes?|lingula|lingular|rul|rml|rll|lul|lll"),
    ),
    ("pancreas", _organ("pancreas|pancreatic|uncinate(?: process)?")),
    (
        "brain",
        _organ(
            "brains?|cerebral|cerebellar|cerebrum|cerebellum|intra-cranial|(?:frontal|parietal|temporal"
            "|occipital) lobes?"
        ),
    ),
    ("gallbladder", _organ("gall-bladders?|gallstones?|cholecyst\\w*")),
    ("bladder", _organ("(?:urinary )?bladder|vesical")),
    (
        "bowel",
        _organ(
            "bowels?|colon|colonic|colorectal|rectal|rectum|duodenum|duodenal|intestines?|intestinal|jejunum"
            "|jejunal|ileum|ileal|c(?:a|ae|e)cum|c(?:a|ae|e)cal|sigmoid|appendix|appendiceal"
        ),
    ),
    ("stomach", _organ("stomach|gastric")),
    ("lymph node", _organ("lymph-nodes?|nodal|nodes?|lymphadenopathy|adenopathy|lymphatic")),
    ("heart", _organ("hearts?|cardiac|pericardial|pericardium|myocardial|myocardium|atrial|atrium|ventricular")),
    ("prostate", _organ("prostate|prostatic")),
    ("uterus/ovary", _organ("uterus|uterine|ovary|ovaries|ovarian|adnexal?|adnexa|endometrial|cervix")),
    ("breast", _organ("breasts?|mammary")),
    ("thyroid", _organ("thyroid(?: gland)?")),
    ("esophagus", _organ("o?esophag(?:us|eal)")),
    ("peritoneum", _organ("peritoneum|peritoneal|omentum|omental|mesentery|mesenteric")),
    ("soft tissue", _organ("subcutaneous|skin|muscles?|muscular|abdominal wall")),
)
ORGAN_PARTS = _rx("(?:upper|lower|mid|interpolar) poles?")
#: Landmarks outside the liver that name no organ of their own lesion.
LANDMARKS = _rx("porta hepatis|(?:hepatic|liver) hil(?:um|ar)")
#: Words after which an organ is a neighbour of the lesion, not its organ ("the lesion abutting the gallbladder").
NEIGHBOUR_CUES = _rx(
    "near(?:by)?|adjacent|abutt?(?:ing|s)?|touch(?:ing|es)|contact(?:ing)?|next to|(?:close|closer|closest|nearest"
    "|nearer) to|nearest|beside|border(?:ing|s)?|along|against|facing|towards?|compress(?:ing|es)|indent(?:ing|s)"
    "|displac(?:ing|es)|invad(?:ing|es)|extend(?:ing|s)|protrud(?:ing|es)|bulg(?:ing|es)|encas(?:ing|es)|above|below"
    "|behind|(?:anterior|posterior|medial|lateral|superior|inferior|cranial|caudal|deep|superficial)(?:ly)? to"
    "|in front of|level of|from|neighbou?ring|adjoining|between|than|relative to|overlying|underlying|impinging on"
    "|sparing|outside(?: of)?|away from"
)
#: ... unless the lesion grows out of it ("the mass arising from the left kidney").
ORGAN_OF_ORIGIN = _rx("(?:arising|originating|emanating|growing|coming) (?:from|in|out of|within)")
#: "closest to the top of the liver": the organ after a part of it is the lesion's own.
PART_OF = re.compile(
    r"\b(?:top|front|back|bottom|dome|surface|edge|margin|side|half|part|portion|tip|apex|periphery|centre|center"
    r"|capsule) of (?:the )?$"
)
NEIGHBOUR_AFTER = re.compile(r"[\s-]+(?:fossa|bed|impression|flexure|hil(?:um|a)|veins?|artery|arteries|ducts?)\b")
ORIGIN_AFTER = re.compile(r"[\s-]+(?:primary|origin|(?:cancer|carcinoma|tumou?r)[\s-]+(?:metasta|mets?\b|secondar))")
PRIMARY_SITES = re.compile(r"colorectal|colon|rectal|breast")
METASTASIS_NEXT = re.compile(r"[\s-]+(?:liver |hepatic )?(?:metasta|mets?\b|secondar|deposit)")

SUPERLATIVES = (
    (
        "largest",
        _rx(
            "largest|biggest|greatest|dominant|most (?:voluminous|sizeable|sizable|bulky)|maximal|larger"
            "|bigger|big one|large one"
        ),
    ),
    (
        "smallest",
        _rx("smallest|tiniest|least (?:voluminous|bulky)|smaller|tinier|minimal|small one|little one|tiny one"),
    ),
    (
        "uppermost",
        _rx(
            "(?:upper|top|superior|cranial)-most|highest|most (?:superior|superiorly|cranial|cranially"
            "|cephalad|cephalic)|(?:nearest|closest)(?: to)? the top|from the top|(?:furthest|farthest)"
            " (?:up|superiorly|cranially)"
        ),
    ),
    (
        "lowest",
        _rx(
            "lowest|(?:lower|bottom|inferior|caudal)-most|most (?:inferior|inferiorly|caudal|caudally)"
            "|(?:nearest|closest)(?: to)? the bottom|from the bottom|(?:furthest|farthest) (?:down|inferiorly"
            "|caudally)"
        ),
    ),
    (
        "most_anterior",
        _rx(
            "most (?:anterior|anteriorly|ventral|ventrally)|(?:front|fore|anterior|ventral)-most"
            "|(?:nearest|closest)(?: to)? the front|from the front|(?:furthest|farthest) (?:forward"
            "|anteriorly|to the front)"
        ),
    ),
    (
        "most_posterior",
        _rx(
            "most (?:posterior|posteriorly|dorsal|dorsally)|(?:rear|hind|back|posterior|dorsal)-most"
            "|(?:nearest|closest)(?: to)? the back|from the back|(?:furthest|farthest) (?:back"
            "|backward|posteriorly|to the back)"
        ),
    ),
    (
        "rightmost",
        _rx(
            "right-most|most right-sided|most rightward|from the right|(?:furthest|farthest|furthermost"
            "|most) (?:to the |towards? the )?(?:patient's )?right(?: side| hand side)?"
        ),
    ),
    (
        "leftmost",
        _rx(
            "left-most|most left-sided|most leftward|from the left|(?:furthest|farthest|furthermost"
            "|most) (?:to the |towards? the )?(?:patient's )?left(?: side| hand side)?"
        ),
    ),
)
BARE_POSITIONS = (  # a comparative or bare position picks among the lesions: "the upper one", "the front cyst"
    ("uppermost", _rx("upper|top|superior|superiorly|higher|cranial|cranially|cephalad|cephalic", after=NOT_RELATION)),
    ("lowest", _rx("lower|bottom|inferior|inferiorly|caudal|caudally", after=NOT_RELATION)),
    ("most_anterior", _rx("(?<!in\\s)front|anterior|anteriorly|ventral|ventrally", after=NOT_RELATION)),
    ("most_posterior", _rx("back|posterior|posteriorly|dorsal|dorsally|rear", after=NOT_RELATION)),
    (
        "rightmost",
        _rx(
            "(?:on|to|towards?) the (?:patient's )?(?:far )?right(?: side| hand side)?|right one"
            "|right-hand one|(?:more|further|farther) to the right|(?:further|farther) right"
        ),
    ),
    (
        "leftmost",
        _rx(
            "(?:on|to|towards?) the (?:patient's )?(?:far )?left(?: side| hand side)?|left one"
            "|left-hand one|(?:more|further|farther) to the left|(?:further|farther) left"
        ),
    ),
)
QUANTIFIERS = (
    ("only", _rx("only|single|solitary|lone|sole|unique|isolated|just one|one and only")),
    (
        "all",
        _rx(
            "all(?: of)?|every(?: one of)?|each(?: of)?|entire|whole|multiple|several|numerous|many|various|(?:a )?few"
        ),
    ),
    ("both", _rx("both(?: of)?|(?:a |the )?(?:pair|couple) of")),
)
COUNTS = _rx("\\d+", *NUMBERS, loose=False)
ORDINAL_WORDS = _rx(*list(ORDINALS)[1:5], *list(ORDINALS)[9:13], loose=False)
NEGATIONS = re.compile(
    r"(?<![\w'])(?:not|cannot|other than|except(?: for)?|excluding|exclude|apart from|aside from|rather than"
    r"|outside(?: of)?|without|besides|never|none of)(?![\w])|n't(?![\w])|(?<![\w])non-(?=[a-z])"
    r"|(?<![\w])non(?=(?:cystic|metastatic|solid|neoplastic|hepatic|enhancing)\b)"
)
QUESTION_START = re.compile(r"^(?:please )?(?:is|are|was|were|does|do|did|has|have|any|anything)\b")
QUESTION_ANY = re.compile(r"\b(?:is|are) there\b|\bany (?:evidence|sign|signs|trace|suggestion)\b|\bwhether\b")
NOT_QUESTION_START = re.compile(r"^(?:please )?(?:which|what|where|how|who|can you|could you|would you|will you)\b")
#: "segment two lesions" at the start of a sentence is the command, not segment 2.
VERB_SEGMENT = re.compile(
    rf"^(?:please )?segment(?=\s+(?:{'|'.join(NUMBERS)})\s+(?:\S+\s+){{0,2}}?"
    r"(?:lesions|cysts|nodules|metastases|mets|masses|tumou?rs|foci|abnormalities|hypodensities|ones)\b)"
)
#: "the larger of the two cysts": the number describes the set the selector picks from, it is not a count.
#: "lesion 3", "cyst no 2": a number after a lesion noun labels it.
LABEL_BEFORE = re.compile(r"\b(?:lesion|nodule|cyst|met|metastasis|mass|tumou?r|focus|number|no)\s*$")
OF_THE = re.compile(r"\bof (?:the |these |those )?$")

FILLER = set(
    """please pls plz kindly can could would will you me us i we my our your show display find locate localise
    localize highlight identify detect mark outline delineate contour segment segments segmentation trace draw circle
    label annotate select pick get give return isolate extract visualise visualize see look search point where which
    what whether is are was were be been being there here it its this these those that that's there's it's what's
    where's who do does did has have had contain contains containing any anything some evidence sign signs suggestion
    presence focal simple discrete known suspected possible probable presumed visible seen noted present located
    lying situated sitting positioned placed found measuring measures measured about approximately approx roughly
    around circa ca size sized diameter volume across one ones patient patient's patients image images scan ct study
    exam mask tell also just exactly really then now thanks thank part portion region parenchyma parenchymal side
    head tail body neck pole hilum cortex tissue want need like should must let's lets if so up out most more lies
    lie sits sit resides
    arising originating emanating growing coming""".split()
)
LIGHT = set("the a an to of with and in on at from by for into within inside onto as or among amongst".split())
#: Known words an unread long word may be a typo of.
VOCABULARY = sorted(
    set(
        """lesion lesions nodule nodules metastasis metastases metastatic secondary secondaries deposit deposits
        cyst cysts cystic tumour tumours tumor tumors neoplasm neoplasms neoplastic carcinoma hepatoma hepatocellular
        hypodense hyperdense hypoattenuating hyperattenuating hypoenhancing hyperenhancing attenuation density dense
        bright brightest darkest largest biggest smallest tiniest dominant uppermost highest lowest superior inferior
        anterior posterior cranial caudal cephalad rightmost leftmost furthest farthest segment segments couinaud
        caudate quadrate hemiliver liver hepatic spleen splenic kidney kidneys renal pulmonary pancreas pancreatic
        adrenal gallbladder vertebra vertebral osseous cerebral intracranial abnormality abnormalities centimetre
        centimetres centimeter millimetre millimetres diaphragm subdiaphragmatic solitary single outline delineate
        highlight identify abutting adjacent hypodensity lymphadenopathy""".split()
    )
)
KIND_PRIORITY = ("metastasis", "cyst", "tumour")  # "cystic metastasis" is a metastasis, "metastatic mass" too
NEGATABLE = ("lobe", "segment", "kind", "density", "size", "select", "extra_select")


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class ReadQuery:
    """What :func:`read_query` read from one sentence; see the module docstring for the fields."""

    text: str
    organ: str = "liver"
    query: Query = field(default_factory=Query)
    extra_select: str | None = None
    ordinal: int | None = None
    count: int | None = None
    diameter_mm: float | None = None
    size_compare: str | None = None
    excluded: tuple[tuple[str, object], ...] = ()
    negated: bool = False
    question: bool = False
    lesion_word: bool = False
    unread: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def select(self) -> str:
        """The selector as read, one of :data:`READ_SELECTORS`."""
        return self.extra_select or self.query.select

    @property
    def in_scope(self) -> bool:
        return self.organ == "liver"

    @property
    def fully_read(self) -> bool:
        return not self.unread

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "organ": self.organ,
            "query": self.query.to_dict(),
            "extra_select": self.extra_select,
            "ordinal": self.ordinal,
            "count": self.count,
            "diameter_mm": self.diameter_mm,
            "size_compare": self.size_compare,
            "excluded": {k: list(v) if isinstance(v, tuple) else v for k, v in self.excluded},
            "negated": self.negated,
            "question": self.question,
            "lesion_word": self.lesion_word,
            "unread": list(self.unread),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class _Hit:
    start: int
    end: int
    field: str
    value: object = None
    noun: bool = False
    plural: bool = False
    lesion: bool = False
    negated: bool = False


class _Sentence:
    """The normalised sentence, the phrases read so far and the characters they claimed."""

    def __init__(self, text: str):
        self.text = text
        self.free = text  # claimed characters are replaced by NUL so no later phrase matches across them
        self.hits: list[_Hit] = []

    def claim(self, pattern: re.Pattern, name: str, value=None, **flags) -> list[_Hit]:
        found = []
        for match in pattern.finditer(self.free):
            hit = _Hit(match.start(), match.end(), name, value(match) if callable(value) else value, **flags)
            found.append(hit)
        for hit in found:
            self.free = self.free[: hit.start] + "\0" * (hit.end - hit.start) + self.free[hit.end :]
        self.hits += found
        return found

    def fields(self, *names: str, negated: bool | None = False) -> list[_Hit]:
        return sorted(
            (h for h in self.hits if h.field in names and (negated is None or h.negated == negated)),
            key=lambda h: h.start,
        )


def _normalise(text: str) -> str:
    s = text.lower().translate(
        {0x2019: "'", 0x2018: "'", 0x2013: "-", 0x2014: "-", 0xD7: "x", 0x2265: ">", 0x2264: "<"}
    )
    s = re.sub(r"(?<=\d),(?=\d)", ".", s)  # 2,5 cm
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # full stops and abbreviation dots, not decimal points
    s = re.sub(r"[^a-z0-9.'<>=/&\-\s]", " ", s)
    s = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", s)
    s = re.sub(r"\s+-\s+|-{2,}", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def _plural(words: str) -> bool:
    last = re.split(r"[\s-]+", words)[-1]
    return last == "foci" or (last.endswith("s") and not last.endswith(("sis", "ss", "us")))


def _segments(match: re.Match) -> tuple[int, ...]:
    text = match.group(0)
    ordinal = re.match(rf"({'|'.join(ORDINALS)})\b", text)
    if ordinal:
        return (ORDINALS[ordinal.group(1)],)
    rest = re.sub(r"couinaud|hepatic|liver|segments?|segs?|sgmts?", " ", text)
    numbers = re.findall(
        rf"(?<![a-z])(viii|vii|vi|iv|v|iii|ii|i|{'|'.join(list(NUMBERS)[:8])})(?=[ab]?(?![a-z]))|([12345678])", rest
    )
    return tuple(dict.fromkeys(ROMAN.get(w) or NUMBERS.get(w) or int(d) for w, d in numbers))


def _size(match: re.Match) -> float:
    text = match.group(0)
    values = [float(v) if v[0].isdigit() else NUMBERS[v] for v in re.findall(rf"\d+(?:\.\d+)?|\b{_NUM}\b", text)]
    unit = 1.0 if re.search(r"mm|millimet", text) else 10.0
    return max(values) * unit if values else 10.0  # "sub-centimetre" states no number: 1 cm


def _side(match: re.Match) -> str:
    return "right" if next(g for g in match.groups() if g).startswith("r") else "left"


def _organ_role(sentence: _Sentence, hit: _Hit) -> str:
    """'in' for the organ a lesion is in or of, 'neighbour' for one that only describes where the lesion is."""
    text = sentence.text
    if hit.value != "liver" and (NEIGHBOUR_AFTER.match(text, hit.end) or ORIGIN_AFTER.match(text, hit.end)):
        return "neighbour"
    if PRIMARY_SITES.fullmatch(text[hit.start : hit.end]) and METASTASIS_NEXT.match(text, hit.end):
        return "neighbour"  # "colorectal metastasis": where it came from
    nouns = [h.end for h in sentence.fields("kind", "noun", "unplaced", negated=None) if h.end <= hit.start]
    window = text[max([hit.start - 45, *nouns]) : hit.start]
    if ORGAN_OF_ORIGIN.search(window) or PART_OF.search(window):
        return "in"
    return "neighbour" if NEIGHBOUR_CUES.search(window) else "in"


def _scan(text: str) -> _Sentence:
    s = _Sentence(text)
    s.claim(VERB_SEGMENT, "filler")
    s.claim(NEGATIONS, "negation")
    s.claim(DOME, "select", "closest_to_dome")
    for name, value, pattern in SECTORS:
        s.claim(pattern, name, (value,) if name == "segment" else value)
    s.claim(SEGMENTS, "segment", _segments)
    s.claim(POSITION_IN_LOBE, "unplaced")
    s.claim(LOBES, "lobe", _side)
    for compare, pattern in SIZES:
        if compare == "distance":  # "3 cm from the dome" is not a size
            s.claim(pattern, "unplaced")
        else:
            s.claim(pattern, "size", lambda m, c=compare: (_size(m), c))
    for value, pattern in BRIGHTNESS:
        s.claim(pattern, "extra_select", value)
    for kind, pattern in KINDS:
        for hit in s.claim(pattern, "kind", kind):
            word = re.split(r"[\s-]+", text[hit.start : hit.end])[-1]
            hit.noun, hit.lesion = word not in ADJECTIVES, True
            hit.plural = hit.noun and _plural(word)
    for density, pattern, noun in DENSITIES:
        for hit in s.claim(pattern, "density", density):
            hit.noun, hit.lesion, hit.plural = noun, noun, noun and _plural(text[hit.start : hit.end])
    for hit in s.claim(NOUNS, "noun", lesion=True, noun=True) + s.claim(UNPLACED, "unplaced", lesion=True, noun=True):
        hit.plural = _plural(text[hit.start : hit.end])
    s.claim(ORGAN_PARTS, "filler")
    s.claim(LANDMARKS, "neighbour")
    for organ, pattern in ORGANS:
        for hit in s.claim(pattern, "organ", organ):
            if _organ_role(s, hit) == "neighbour":
                hit.field = "neighbour"
    for select, pattern in SUPERLATIVES + BARE_POSITIONS:
        s.claim(pattern, "select", select)
    s.claim(WEAK_LOBES, "lobe", _side)
    for quantity, pattern in QUANTIFIERS:
        s.claim(pattern, quantity)
    for hit in s.claim(PRONOUNS, "noun", noun=True):
        hit.plural = _plural(text[hit.start : hit.end])
    s.claim(ORDINAL_WORDS, "ordinal", lambda m: ORDINALS[m.group(0)])
    for hit in s.claim(COUNTS, "count", lambda m: int(m.group(0)) if m.group(0).isdigit() else NUMBERS[m.group(0)]):
        if LABEL_BEFORE.search(text[: hit.start]):
            hit.field = "unplaced"  # "lesion 3", "cyst no 2": a label, not a count
    _apply_negations(s)
    return s


def _apply_negations(s: _Sentence) -> None:
    """A negation applies to the first attribute read within a few words after it."""
    for cue in s.fields("negation"):
        following = [h for h in s.fields(*NEGATABLE, negated=None) if h.start >= cue.end and not h.negated]
        if following and following[0].start - cue.end <= 30:
            following[0].negated = True


def _unread(s: _Sentence, claimed_too: bool = True) -> list[str]:
    """Runs of words that no phrase claimed (and, with ``claimed_too``, those that name a neighbour or a lesion
    type a Query cannot hold), joined across articles and prepositions."""
    reported = [(h.start, h.end) for h in s.hits if claimed_too and h.field in ("neighbour", "unplaced")]
    tokens = []
    for match in re.finditer(r"[a-z0-9]+(?:['.-][a-z0-9]+)*", s.text):
        word, start, end = match.group(0), match.start(), match.end()
        if any(a < end and start < b for a, b in reported):
            kind = "unread"
        elif "\0" in s.free[start:end]:
            kind = "read"
        else:
            kind = "light" if word in LIGHT else "read" if word in FILLER else "unread"
        tokens.append((word, kind))
    runs, current = [], []
    for word, kind in tokens + [("", "read")]:
        if kind == "read":
            while current and current[-1][1] == "light":
                current.pop()
            if current:
                runs.append(" ".join(w for w, _ in current))
            current = []
        elif kind == "unread" or current:
            current.append((word, kind))
    return runs


def _assemble(text: str, s: _Sentence, question: bool, notes: list[str]) -> ReadQuery:
    hit_values = lambda *names: [h.value for h in s.fields(*names)]  # noqa: E731
    organs = hit_values("organ")
    organ = "liver" if not organs or "liver" in organs else organs[0]
    superlatives = hit_values("select")
    if len(set(superlatives)) > 1:
        notes.append(f"several selectors read, the first one kept: {', '.join(dict.fromkeys(superlatives))}")
    extra = (hit_values("extra_select") or [None])[0]
    picks_one = bool(superlatives or extra)  # then "of the two" says what they are picked from, not a count
    counts = [2 for _ in s.fields("both")] + [
        h.value for h in s.fields("count") if h.value >= 2 and not (picks_one and OF_THE.search(s.text[: h.start]))
    ]
    nouns = [h for h in s.fields("kind", "noun", "density", "unplaced") if h.noun]
    plural = any(h.plural and not re.search(r"\bone of (?:the )?$", s.text[: h.start]) for h in nouns)
    if superlatives:
        select = superlatives[0]
    elif extra is None and (s.fields("all") or counts or (plural and not s.fields("only"))):
        select = "all"
    else:
        select = "only"
    kinds = hit_values("kind")
    kind = next((k for k in KIND_PRIORITY if k in kinds), None)
    densities = hit_values("density")
    lobes = hit_values("lobe")
    segments = [n for value in hit_values("segment") for n in value]
    lobe, segment = (lobes or [None])[-1], None
    if 1 in segments:
        notes.append("segment 1 (caudate lobe) is read but a Query cannot hold it")
        segments = [n for n in segments if n != 1]
    if len(segments) == 1:
        segment = segments[0]
    elif segments:
        notes.append(f"several segments read ({', '.join(map(str, segments))}): only their lobe is kept")
        sides = {"left" if n in LEFT_SEGMENTS else "right" for n in segments}
        lobe = lobe or (sides.pop() if len(sides) == 1 else None)
    if organ != "liver" and (lobe or segment):
        notes.append(f"lobe / segment words are liver anatomy and not read for the {organ}")
        lobe = segment = None
    sizes = hit_values("size")
    diameter_mm, compare = sizes[0] if sizes else (None, None)
    diameter_cm = int(diameter_mm / 10.0 + 0.5) if diameter_mm is not None and compare is None else None
    excluded = {}
    for hit in s.fields(*NEGATABLE, negated=True):
        name, value = hit.field, hit.value
        if name == "size":
            name, value = "diameter_cm", int(value[0] / 10.0 + 0.5)
        elif name == "segment":
            value = value[0] if len(value) == 1 else value
        excluded.setdefault(name, value)
    ordinals = hit_values("ordinal")
    return ReadQuery(
        text=text,
        organ=organ,
        query=Query(
            select=select,
            lobe=lobe,
            segment=segment,
            kind=kind,
            density=densities[-1] if densities else None,
            diameter_cm=diameter_cm,
        ),
        extra_select=extra,
        ordinal=ordinals[0] if ordinals else None,
        count=counts[0] if counts else None,
        diameter_mm=diameter_mm,
        size_compare=compare,
        excluded=tuple(excluded.items()),
        negated=bool(s.fields("negation")),
        question=question,
        lesion_word=any(h.lesion for h in s.hits),
        unread=tuple(_unread(s)),
        notes=tuple(notes),
    )


def _is_question(raw: str, text: str) -> bool:
    if QUESTION_START.search(text) or QUESTION_ANY.search(text):
        return True
    return raw.rstrip().endswith("?") and not NOT_QUESTION_START.search(text)


def read_query(text: str) -> ReadQuery:
    """Read one referring expression; see the module docstring for what goes in and out.

    Args:
        text: the sentence, in any case, with or without punctuation.

    Returns:
        the :class:`ReadQuery`; a sentence with no recognisable content reads as ``Query()`` about the liver with
        ``lesion_word`` False and its words in ``unread``.
    """
    normal = _normalise(str(text))
    sentence = _scan(normal)
    notes: list[str] = []
    corrections = {}
    for phrase in _unread(sentence, claimed_too=False):
        for word in phrase.split():
            if len(word) >= 6 and word.isalpha() and word not in VOCABULARY:
                close = difflib.get_close_matches(word, VOCABULARY, n=1, cutoff=0.85)
                if close:
                    corrections[word] = close[0]
    if corrections:
        normal = re.sub(r"[a-z]+", lambda m: corrections.get(m.group(0), m.group(0)), normal)
        sentence = _scan(normal)
        notes += [f"read '{wrong}' as '{right}'" for wrong, right in corrections.items()]
    return _assemble(str(text), sentence, _is_question(str(text), normal), notes)
