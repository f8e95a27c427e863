"""The settings every evaluation command shares (`emovlm-kd evaluate`, `emovlm-kd table1`) beside
`emovlm_kd.settings.RuntimeArguments`. Imports nothing heavy: the commands add these flags before `--help` is printed."""

from dataclasses import dataclass

from emovlm_kd.settings import REQUIRED, Checked, help_field


@dataclass(kw_only=True)
class EvaluationArguments(Checked):
    """Which split is evaluated, how much of it, and where the report goes."""

    _argument_group_name = "Evaluation"
    split: str = help_field("dataset split to evaluate", "test")
    limit: int | None = help_field("evaluate a stratified sample of N images (every class in proportion, seeded)")
    output_dir: str = help_field("folder for the report files", REQUIRED)

    def _checks(self):
        yield self.limit is None or self.limit >= 1, "limit", "must be >= 1"
