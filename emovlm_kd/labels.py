"""Known label sets, in their fixed, documented order."""

MIKELS8 = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
EKMAN6 = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
SENTIMENT2 = ("negative", "positive")

KNOWN_LABEL_SETS = {"mikels8": MIKELS8, "ekman6": EKMAN6, "sentiment2": SENTIMENT2}


def canonical_label_order(labels):
    """A known label set keeps its documented order (Mikels 8 and Ekman 6 alphabetical as in the paper,
    negative/positive); anything else is sorted."""
    names = {str(label).strip().lower() for label in labels}
    for known in KNOWN_LABEL_SETS.values():
        if names == set(known):
            return list(known)
    return sorted(names)
