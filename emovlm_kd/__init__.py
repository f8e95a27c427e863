"""EmoVLM-KD tooling: tiny offline models, Hub bundle saving, the `emovlm-kd` command line."""

__version__ = "0.1.0"
