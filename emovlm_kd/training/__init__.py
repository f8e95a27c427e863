"""The project's training code: settings, the stages, Trainer subclasses, caches, the model card."""
