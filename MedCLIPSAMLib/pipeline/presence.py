"""Is the target in the image at all? CLIP zero-shot classification between the prompt's sentences and
its "absent" sentences (what an image without the target looks like, e.g. "a normal brain MRI").

lead = max over the prompt's sentences of cos(image, s) - max over the absent sentences of cos(image, a).
The target counts as present where the lead exceeds a margin (0 by default). Sentences, not averages, on
both sides: an averaged ensemble sits lower than any one sentence that fits, so mean against max would
always say absent.
"""

import numpy as np


def sentence_cosines(features, sentences, text):
    """[sentence, image] cosines of L2-normalised image features [N, D]; `text` is a TextEmbeddings (its
    per-sentence cache is shared with the prompt's ensemble, and missing sentences are encoded in one
    batch, not one by one)."""
    feats = features.float().cpu()
    # one product per sentence, all of the same shape: a sentence on both sides (prompt and absent) gets
    # bit-identical cosines, so it can never beat itself (one matrix product per side could differ in the
    # last bit with the number of rows)
    return np.stack([(feats @ e).numpy() for e in text.sentences(tuple(sentences)).float().cpu()])


def presence_lead(features, prompt, text):
    """Per image: the best prompt sentence's cosine minus the best absent sentence's."""
    return (sentence_cosines(features, prompt.sentences, text).max(axis=0)
            - sentence_cosines(features, prompt.absent, text).max(axis=0))


def winning_absent(features, prompt, text, lead):
    """The absent sentence closest to the image where the prompt leads most (the one that beat it)."""
    best = int(np.argmax(lead))
    cos = sentence_cosines(features[best:best + 1], prompt.absent, text)[:, 0]
    return prompt.absent[int(np.argmax(cos))]


def absent_reason(features, prompt, text, lead, margin):
    """Why the target counts as absent: the absent sentence that won on the image with the best lead."""
    return (f"absent: '{winning_absent(features, prompt, text, lead)}' fits better than the prompt "
            f"(best lead {float(np.max(lead)):+.3f}, needed > {margin:+.3f})")
