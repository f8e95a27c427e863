"""Training: data loading, the teacher, distillation and gate stages."""
