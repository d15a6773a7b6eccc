"""OK-VQA answer stemming, as OpenFlamingo applies it to generated answers, without downloaded data.

OK-VQA v1.1 scores answers in a stemmed form, so OpenFlamingo stems every generated OK-VQA answer
before the VQA accuracy (`open_flamingo/eval/ok_vqa_utils.py`, `OKVQAStemmer`, MIT licence):

  for word, tag in nltk.pos_tag(nltk.word_tokenize(answer)):
    word in _MANUAL_MATCHES     -> _MANUAL_MATCHES[word]    (hand-made, from the released answers)
    elif word ends with "ing"   -> nltk WordNetLemmatizer().lemmatize(word, "v")
    elif tag is NNS or NNPS     -> inflection.singularize(word)
  " ".join(words)

nltk's tokenizer is code, but its sentence splitter, POS tagger and WordNet are data packages that
nltk downloads at run time, which we never do. What `stem` does instead, step by step:

- Tokens: nltk's own word tokenizer (`word_tokenize(..., preserve_line=True)`), i.e. the same
  tokenizer minus punkt sentence splitting. Differs only when an answer holds two sentences: "dog. cat"
  keeps "dog." whole where punkt would split off the period.
- Manual table: OpenFlamingo's, verbatim.
- "-ing" words: `WordNetLemmatizer.lemmatize(w, "v")` returns the shortest of w and its morphy
  forms (WordNet's verb exceptions, else nltk's verb suffix rules) that WordNet lists as a verb, and w
  itself when there is none. We apply that same rule with lemminflect's lexicon (shipped inside its
  wheel) as the list of verbs: candidates are w, lemminflect's verb lemmas of w (which cover the
  irregular forms WordNet keeps in verb.exc) and the suffix-rule forms (nltk's rules, imported). The
  shortest-candidate rule is kept on purpose: it gives WordNet's "rating" -> "rat", "hoping" -> "hop",
  "shining" -> "shin" (OpenFlamingo's manual table exists to override several of these, e.g.
  "riding" -> "ride"). Measured offline against nltk 3.10.4 with WordNet 3.0 on the 8179 "-ing" words
  of WordNet and lemminflect, 86.7% agree; the rest are lexicon differences, mostly rare or
  hyphenated words ("bobsledding", "re-visiting", "sightseeing" stays unchanged here, WordNet gives
  "sightsee"). Like WordNet (whose index is lower case; nltk does not lower-case), a word with a
  capital letter stays as it is.
- NNS/NNPS: there is no tagger. A token counts as a plural noun when lemminflect lists it as a noun
  form with a lemma other than itself ("dogs", "glasses", "men", "pants"), or it is a noun that
  `inflection` singularizes to a known noun and pluralizes back ("people" <-> "person"), and it has no
  auxiliary reading ("does", "has"); a word lemminflect does not know counts as plural when it is
  alphanumeric and ends in "s" ("legos", "sunglasses", "1950s"), which is what a tagger mostly does
  with unknown -s words. Context is ignored: in "he runs" the tagger would say VBZ and leave "runs";
  here it becomes "run". Which words are singularized and how is `inflection`'s, as in OpenFlamingo.
"""

import functools
import re

import inflection
import lemminflect

# Verbatim from OpenFlamingo's ok_vqa_utils.py: words the automatic rules miss or get wrong, with the
# form the OK-VQA answers use.
_MANUAL_MATCHES = {
  "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean",
  "hell's": "hell", "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are",
  "riding": "ride", "leaves": "leaf", "dangerous": "danger", "clothing": "cloth", "texting": "text",
  "kiting": "kite", "firefighters": "firefight", "ties": "tie", "married": "married",
  "teething": "teeth", "gloves": "glove", "tennis": "tennis", "dining": "dine",
  "directions": "direct", "waves": "wave", "christmas": "christmas", "drives": "drive",
  "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta", "hornes": "horn",
  "graves": "grave", "mating": "mate", "paned": "pane", "alertness": "alert",
  "sunbathing": "sunbath", "tenning": "ten", "wetness": "wet", "urinating": "urine",
  "sickness": "sick", "braves": "brave", "firefighting": "firefight", "lenses": "lens",
  "reflections": "reflect", "backpackers": "backpack", "eatting": "eat", "designers": "design",
  "curiousity": "curious", "playfulness": "play", "blindness": "blind", "hawke": "hawk",
  "tomatoe": "tomato", "rodeoing": "rodeo", "brightness": "bright", "circuses": "circus",
  "skateboarders": "skateboard", "staring": "stare", "electronics": "electron",
  "electicity": "elect", "mountainous": "mountain", "socializing": "social",
  "hamburgers": "hamburg", "caves": "cave", "transitions": "transit", "wading": "wade",
  "creame": "cream", "toileting": "toilet", "sautee": "saute", "buildings": "build",
  "belongings": "belong", "stockings": "stock", "walle": "wall", "cumulis": "cumuli",
  "travelers": "travel", "conducter": "conduct", "browsing": "brows", "pooping": "poop",
  "haircutting": "haircut", "toppings": "top", "hearding": "heard", "sunblocker": "sunblock",
  "bases": "base", "markings": "mark", "mopeds": "mope", "kindergartener": "kindergarten",
  "pies": "pie", "scrapbooking": "scrapbook", "couponing": "coupon", "meetings": "meet",
  "elevators": "elev", "lowes": "low", "men's": "men", "childrens": "children", "shelves": "shelve",
  "paintings": "paint", "raines": "rain", "paring": "pare", "expressions": "express",
  "routes": "rout", "pease": "peas", "vastness": "vast", "awning": "awn", "boy's": "boy",
  "drunkenness": "drunken", "teasing": "teas", "conferences": "confer", "ripeness": "ripe",
  "suspenders": "suspend", "earnings": "earn", "reporters": "report", "kid's": "kid",
  "containers": "contain", "corgie": "corgi", "porche": "porch", "microwaves": "microwave",
  "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen",
  "striping": "stripe", "purring": "pure", "professionals": "profession", "piping": "pipe",
  "farmer's": "farmer", "potatoe": "potato", "emirates": "emir", "womens": "women",
  "veteran's": "veteran", "wilderness": "wilder", "propellers": "propel", "alpes": "alp",
  "charioteering": "chariot", "swining": "swine", "illness": "ill", "crepte": "crept",
  "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi",
  "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug",
  "doves": "dove", "nationals": "nation", "mustange": "mustang", "ringe": "ring",
  "gondoliere": "gondolier", "vacationing": "vacate", "reminders": "remind", "baldness": "bald",
  "settings": "set", "glaced": "glace", "coniferous": "conifer", "revelations": "revel",
  "personals": "person", "daughter's": "daughter", "badness": "bad", "projections": "project",
  "polarizing": "polar", "vandalizers": "vandal", "minerals": "miner", "protesters": "protest",
  "controllers": "control", "weddings": "wed", "sometimes": "sometime", "earing": "ear",
}

_ALNUM = re.compile(r"[A-Za-z0-9]+")


@functools.cache
def _nltk():
  """nltk's word tokenizer and WordNet's verb suffix rules; imported on first use (nltk is slow to
  import and only OK-VQA needs it). Neither needs nltk's data packages."""
  from nltk.corpus.reader import wordnet
  from nltk.tokenize import word_tokenize

  return word_tokenize, wordnet.WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS[wordnet.VERB]


def _is_verb(word: str) -> bool:
  """Whether `word` is a verb lemma in lemminflect's lexicon (WordNet's verb index in nltk)."""
  return bool(lemminflect.getAllInflections(word, upos="VERB"))


@functools.lru_cache(maxsize=1 << 16)
def lemmatize_verb(word: str) -> str:
  """`WordNetLemmatizer().lemmatize(word, "v")` with lemminflect's lexicon in place of WordNet's."""
  if word != word.lower():  # WordNet's lemma index is lower case and nltk looks words up as given
    return word
  _, rules = _nltk()
  lemmas = lemminflect.getAllLemmas(word, upos="VERB").get("VERB", ())
  suffix_forms = [word[: -len(old)] + new for old, new in rules if word.endswith(old)]
  verbs = [c for c in (word, *lemmas, *suffix_forms) if _is_verb(c)]
  return min(verbs, key=len) if verbs else word  # first of the shortest, as nltk's min() picks


@functools.lru_cache(maxsize=1 << 16)
def is_plural_noun(word: str) -> bool:
  """Stands in for the tagger's NNS/NNPS (see the module docstring for the rule and its limits)."""
  w = word.lower()
  lemmas = lemminflect.getAllLemmas(w)
  if not lemmas:  # unknown to the lexicon: a tagger calls most unknown "-s" words plural nouns
    return w.endswith("s") and len(w) > 2 and _ALNUM.fullmatch(w) is not None
  if "AUX" in lemmas:
    return False
  if any(lemma != w for lemma in lemmas.get("NOUN", ())):
    return True
  # Plurals the lexicon files as their own lemma ("people"): `inflection` decides, when it pairs the
  # word with a singular noun both ways.
  singular = inflection.singularize(w)
  return ("NOUN" in lemmas and singular != w and inflection.pluralize(singular) == w
          and bool(lemminflect.getAllInflections(singular, upos="NOUN")))


def stem(answer: str) -> str:
  """OpenFlamingo's `OKVQAStemmer.stem(answer)`, offline (module docstring: how and where it differs)."""
  word_tokenize, _ = _nltk()
  words = []
  for word in word_tokenize(answer, preserve_line=True):
    if word in _MANUAL_MATCHES:
      word = _MANUAL_MATCHES[word]
    elif word.endswith("ing"):
      word = lemmatize_verb(word)
    elif is_plural_noun(word):
      word = inflection.singularize(word)
    words.append(word)
  return " ".join(words)
