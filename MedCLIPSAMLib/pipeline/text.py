"""Text prompts: prompt ensembles and cached text embeddings.

A prompt that names a known target ("brain tumor", "liver", ...) expands to that target's ensemble of
descriptive sentences (MedCLIPSAMLib/resources/prompt_ensembles.json); the sentences' embeddings are
averaged and re-normalised. Any other prompt is used as written, plus a few neutral templates. A user
can also give their own sentences separated by ' | '. A prompt may also carry "absent" sentences: what
an image WITHOUT the target looks like (the presence test in presence.py).
"""

from dataclasses import dataclass

from ..errors import MedCLIPSAMError
from ..terminology import CATEGORIES, TERMINOLOGY_CONTEXT, find_target, known_targets, load_ensembles  # noqa: F401

TEMPLATES = ("{}", "a medical image showing {}", "the {} in a medical scan", "a radiology image of the {}")


@dataclass(frozen=True)
class Prompt:
    text: str            # what the user typed: the segment name
    sentences: tuple     # what is embedded and averaged
    target: str = None   # the shipped ensemble used, if any
    absent: tuple = ()   # what an image without the target looks like ("a normal brain MRI"); () : no test

    @property
    def color(self):
        target = load_ensembles().get(self.target) if self.target else None
        return tuple(target["color"]) if target else None

    @property
    def terminology(self):
        """Slicer terminology entry string for a known structure (None otherwise)."""
        target = load_ensembles().get(self.target) if self.target else None
        if not target:
            return None
        term = target["terminology"]
        cat_code, cat_meaning = CATEGORIES[term["category"]]
        return (f"{TERMINOLOGY_CONTEXT}~SCT^{cat_code}^{cat_meaning}~SCT^{term['type_code']}^{term['type_meaning']}"
                "~^^~Anatomic codes - DICOM master list~^^~^^")


def split_sentences(text):
    """'a | b' -> ('a', 'b'); None or blanks -> (); a tuple or list is taken as the sentences."""
    if isinstance(text, (tuple, list)):
        return tuple(" ".join(str(s).split()) for s in text if str(s).strip())
    return tuple(" ".join(s.split()) for s in (text or "").split("|") if s.strip())


def make_prompt(text, ensemble=True, absent=None):
    """Validate a prompt and choose the sentences it stands for; `absent`: sentences ('a | b' or a tuple)
    describing an image without the target."""
    if text is None or not str(text).strip():
        raise MedCLIPSAMError("the text prompt is empty; say what to segment, e.g. --prompt 'brain tumor'")
    text = " ".join(str(text).split())
    absent = split_sentences(absent)
    if "|" in text:  # the user's own sentences
        sentences = split_sentences(text)
        return Prompt(text=sentences[0], sentences=sentences, absent=absent)
    target = find_target(text) if ensemble else None
    if target:
        return Prompt(text=text, sentences=tuple(load_ensembles()[target]["sentences"]), target=target,
                      absent=absent)
    if ensemble:
        return Prompt(text=text, sentences=tuple(t.format(text) for t in TEMPLATES), absent=absent)
    return Prompt(text=text, sentences=(text,), absent=absent)


class TextEmbeddings:
    """L2-normalised text embeddings, each sentence encoded once per model.

    `sentences(...)` gives one embedding per sentence; calling it on a Prompt gives the ensemble: the mean
    of its sentences' embeddings, re-normalised. Both draw on one per-sentence cache, so the ensemble and
    the presence test (presence.py, which needs each sentence alone) share their encodings. Sentences not
    yet cached are looked up on disk (text_cache.py: a new process need not run the text tower again), and
    the rest encoded in one batch, without the trailing padding (below), and stored there."""

    def __init__(self, clip, disk=True):
        self.clip = clip
        self._sentences = {}   # sentence -> [D]
        self._ensembles = {}   # sentences tuple -> [D]
        self._disk = None
        if disk:
            from .text_cache import DiskTextCache

            self._disk = DiskTextCache(clip)

    def sentences(self, sentences):
        """[S, D] embeddings of `sentences`, in order."""
        import torch

        todo = [s for s in dict.fromkeys(sentences) if s not in self._sentences]
        if todo and self._disk is not None:
            found = {s: self._disk.get(s) for s in todo}
            self._sentences.update((s, v) for s, v in found.items() if v is not None)
            todo = [s for s in todo if found[s] is None]
        if todo:
            encoded = encode_sentences(self.clip, todo)
            self._sentences.update(zip(todo, encoded))
            for s, v in zip(todo, encoded):
                if self._disk is not None:
                    self._disk.put(s, v)
        return torch.stack([self._sentences[s] for s in sentences])

    def __call__(self, prompt):
        import torch

        if prompt.sentences not in self._ensembles:
            emb = self.sentences(prompt.sentences).mean(dim=0)
            self._ensembles[prompt.sentences] = torch.nn.functional.normalize(emb, dim=0)
        return self._ensembles[prompt.sentences]


def encode_sentences(clip, sentences):
    """L2-normalised embeddings [S, D] of a batch of sentences.

    A Hugging Face text tower (BiomedCLIP's PubMedBERT) is given the tokens only up to the batch's longest
    sentence: the tokenizer pads every sentence to the full context (256), while the ensembles' sentences
    are under 40 tokens, and the tower masks padding out of attention and pooling (its attention mask is
    token != pad), so the padding changes nothing but the time (measured: benchmarks/presence_speed.py).
    Other towers get the full context, as before."""
    import torch

    text = getattr(clip.model, "text", None)
    pad = getattr(getattr(text, "config", None), "pad_token_id", None)
    if pad is None or type(text).__name__ != "HFTextEncoder":
        return clip.encode_text(list(sentences))
    tokens = clip.tokenize(list(sentences))
    used = (tokens != pad).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    with torch.no_grad():
        features = clip.model.encode_text(tokens[:, :length])
    return torch.nn.functional.normalize(features.float(), dim=-1)
