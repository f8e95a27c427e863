"""The paper's published numbers (accuracy, %), printed beside this model's in the reports."""

TABLE1_DATASETS = ("emoset", "fi", "emotion6", "flickr", "instagram")
TABLE1_TITLES = {"emoset": "EmoSet", "fi": "FI", "emotion6": "Emotion6", "flickr": "Flickr", "instagram": "Instagram"}

# Table 1; None where the paper reports no number.
TABLE1 = {
    "ViT": {"emoset": 78.27, "fi": 68.86, "emotion6": 61.95, "flickr": 85.54, "instagram": 85.41},
    "MDAN": {"emoset": 75.75, "fi": 76.41, "emotion6": 61.66, "flickr": 84.26, "instagram": 83.52},
    "Qwen2-VL-7B zero-shot": {"emoset": 39.45, "fi": 53.54, "emotion6": 38.55, "flickr": 68.40, "instagram": 69.97},
    "LLaVA-Next zero-shot": {"emoset": 54.93, "fi": 60.17, "emotion6": 53.36, "flickr": 74.67, "instagram": 78.02},
    "EmoVIT": {"emoset": 83.36, "fi": 68.09, "emotion6": 57.81, "flickr": None, "instagram": None},
    "EmoVLM-KD": {"emoset": 79.83, "fi": 79.51, "emotion6": 73.91, "flickr": 88.90, "instagram": 89.59},
}

# Table 2 (FI): part -> (parameters as counted in the paper, accuracy).
TABLE2_FI = {
    "vlm": (1_091_870_720, 71.19),
    "distill": (3_679_240, 77.37),
    "teacher": (85_804_808, 68.86),
    "emovlm_kd": (1_095_550_096, 79.51),
}

# Table 3: EmoVLM-KD accuracy per head (hidden widths) on FI and Emotion6.
TABLE3 = {
    (1024,): {"fi": 79.51, "emotion6": 73.91},
    (1024, 512): {"fi": 73.98, "emotion6": 69.02},
    (1024, 512, 256): {"fi": 73.80, "emotion6": 68.86},
    (1024, 512, 256, 128): {"fi": 72.43, "emotion6": 67.68},
    (1024, 512, 256, 128, 64): {"fi": 68.59, "emotion6": 63.30},
}

# Table 4: EmoVLM-KD accuracy per gate type on FI, and the paper's names of the gates.
TABLE4_FI = {"concat_linear": 79.51, "moe": 79.24, "bilinear": 78.56, "dynamic_weighting": 78.14, "cross_gating": 78.01}
GATE_TITLES = {
    "concat_linear": "Concat & Linear",
    "moe": "MoE",
    "bilinear": "Bilinear",
    "dynamic_weighting": "DynamicWeighting",
    "cross_gating": "CrossGating",
}

# Figure 3 is a plot; the text gives its conclusions only.
FIGURE3 = ("the paper plots Figure 3 only: on FI and Emotion6 accuracy peaks at alpha = 0.5, "
           "and KL(teacher || head) falls as alpha grows")
