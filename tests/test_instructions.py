"""Stage 0's instruction mix: the paper configs need conversation and reasoning answers (or stop at once, naming
the fix), answers come from a JSONL file, the official code's annotation JSON or an annotator asked the official way,
and the mix a run used is in RUN/eval_results.json and the model card."""

import json
import time

import pytest
from conftest import tiny_settings
from dataset_fixtures import write_fi

from emovlm_kd.cli import main
from emovlm_kd.training import annotate, instructions

SMALL = ["--vlm", "demo", "--teacher", "demo", "--sft-epochs", "1", "--sft-batch-size", "8", "--teacher-epochs", "1",
         "--teacher-batch-size", "16", "--distill-epochs", "2", "--gate-epochs", "2", "--head-hidden-sizes", "32",
         "--batch-size", "16", "--gate-samples", "2"]
PAPER_MIX = ["categorical", "conversation", "reasoning"]


def official_response(n):
    return f"**1. Key elements**\nBright colours and open sky {n}.\n\n**2. Reasoning**\nThe light suggests ease {n}."


def official_annotations(dataset, prefix="images/FI/train"):
    """The official generate_instruction.py's JSON for every train image: {gpt_response, img, img_path, label}."""
    names = dataset["train"].features["label"].names
    return [{"gpt_response": official_response(i), "img": image_id.split("/")[-1],
             "img_path": f"{prefix}/{image_id}", "label": names[label]}
            for i, (image_id, label) in enumerate(zip(dataset["train"]["id"], dataset["train"]["label"]))]


@pytest.fixture(scope="module")
def fi_root(tmp_path_factory):
    return write_fi(tmp_path_factory.mktemp("data") / "FI", per_class=6)


# ---------------------------------------------------------------------------------------------------------------
# Without answers the paper's mix stops at once
# ---------------------------------------------------------------------------------------------------------------


def test_a_paper_config_without_answers_stops_within_seconds_naming_the_fix(fi_root, tmp_path, capsys):
    out = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/fi.yaml", "--dataset", str(fi_root), "--vlm", "demo", "--teacher", "demo",
              "--output-dir", str(out)])
    assert exit_info.value.code == 2 and time.monotonic() - start < 30
    message = capsys.readouterr().err
    for fix in ("conversation and reasoning answers", "--instructions FILE", "--annotator openai",
                "--instruction-kinds categorical"):
        assert fix in message, fix
    assert not out.exists()  # nothing built, nothing loaded


def test_a_source_the_mix_does_not_use_is_refused(fi_root, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("")
    with pytest.raises(SystemExit):
        main(["train", "--config", "demo", "--instructions", str(answers), "--instruction-kinds", "categorical",
              "--output-dir", str(tmp_path / "run")])
    assert "--instruction-kinds categorical uses no conversation or reasoning answers" in capsys.readouterr().err


def test_the_demos_reasoning_answers_go_with_the_demo_dataset_only(fi_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "demo", "--dataset", str(fi_root), "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "--instructions demo (the synthetic dataset's reasoning answers) goes with --dataset demo" in \
        capsys.readouterr().err


def test_the_synthetic_dataset_writes_a_reasoning_answer_per_train_image(tmp_path):
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.data.synthetic import REASONING_FILE

    root = make_synthetic_dataset(tmp_path / "data", labels=["calm", "joy", "fear"], per_class=(4, 1, 1))
    rows = [json.loads(line) for line in (root / REASONING_FILE).read_text().splitlines()]
    train = sorted(str(path.relative_to(root)) for path in (root / "train").glob("*/*.png"))
    assert sorted(row["id"] for row in rows) == train and {row["kind"] for row in rows} == {"reasoning"}
    for row in rows:  # the answer ends with the image's label (its folder), after what the image shows
        label = row["id"].split("/")[1]
        assert row["answer"].endswith(f"so it evokes {label}.") and " stripes" in row["answer"]
    hues = {row["answer"].split()[3] for row in rows}
    assert len(hues) == 3  # one hue a class (red, yellow-green, cyan... as drawn), so the answer describes the image
    (root / REASONING_FILE).unlink()
    assert make_synthetic_dataset(root, labels=["calm", "joy", "fear"], per_class=(4, 1, 1)) == root
    assert len((root / REASONING_FILE).read_text().splitlines()) == len(rows)  # an incomplete dataset is rewritten


def test_instruction_kinds_settings():
    from emovlm_kd.training.config import TrainConfig, parse_train_args

    assert TrainConfig().instruction_kinds == PAPER_MIX  # the paper's
    demo = parse_train_args(["--config", "demo"])  # demo.yaml: a string
    assert demo.instruction_kinds == ["categorical", "reasoning"] and demo.instructions == "demo"
    assert parse_train_args(["--instruction-kinds", "categorical", "reasoning"]).instruction_kinds == [
        "categorical", "reasoning"]
    for bad, why in ((["reasoning"], "must include categorical"), (["categorical", "poem"], "must be some of")):
        with pytest.raises(ValueError, match=why):
            TrainConfig(instruction_kinds=bad)


# ---------------------------------------------------------------------------------------------------------------
# Answers: the official responses, the official JSON, an annotator
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "1. key elements\nA dog.\n\n2. reasoning\nCalm.",
    "**1. Key elements**\nA dog.\n**2. Reasoning**\nCalm.",
    "### 1. Key Elements:\nA dog.\n### 2. Reasoning:\nCalm.",
    "Here you go.\n1) key element: A dog.\n2) reasoning: Calm.",
])
def test_the_official_response_format_is_split_into_two_answers(text):
    assert annotate.parse_annotation(text) == ("A dog.", "Calm.")


@pytest.mark.parametrize("text", ["A calm dog on grass.", "1. key elements\nA dog.", "1. key elements\n\n2. reasoning\n"])
def test_a_response_without_both_sections_gives_nothing(text):
    assert annotate.parse_annotation(text) is None
    assert instructions.answer_rows("x.jpg", text) == []


def test_the_official_annotation_json_imports_directly(fi_root, tmp_path, caplog):
    from emovlm_kd.data import load_image_dataset

    dataset = load_image_dataset(str(fi_root))
    train = dataset["train"]
    entries = official_annotations(dataset)
    entries[1]["label"] = "fear" if entries[1]["label"] != "fear" else "awe"  # written for another label
    entries[2]["gpt_response"] = "No sections here."
    entries.append({"gpt_response": official_response(99), "img": "x.jpg", "img_path": "images/FI/train/awe/x.jpg",
                    "label": "awe"})
    path = tmp_path / "FI_annotations_train.json"
    path.write_text(json.dumps(entries, indent=4))
    with caplog.at_level("WARNING"):
        rows = instructions.read_instruction_file(path, train)
    assert len(rows) == 2 * (len(train) - 2)
    first = [r for r in rows if r["id"] == train["id"][0]]
    assert first == [
        {"id": train["id"][0], "kind": "conversation", "question": instructions.CONVERSATION_QUESTION,
         "answer": "Bright colours and open sky 0."},
        {"id": train["id"][0], "kind": "reasoning", "question": instructions.REASONING_QUESTION,
         "answer": "The light suggests ease 0."},
    ]
    assert "1 answer(s) match no train image" in caplog.text and "images/FI/train/awe/x.jpg" in caplog.text
    assert "carry another label" in caplog.text and "have no '1. key elements'" in caplog.text


# Bad instruction files (issue 22 item 4), each as a hostile user wrote it: rows of our JSONL format (README
# "Instruction data") or of the official generate_instruction.py JSON (`official_annotations` above).
def jsonl_with(bad_line, at, train_ids):
    """A JSONL of good reasoning rows (one per train image, cycled) with `bad_line` as line `at`."""
    lines = [json.dumps({"id": train_ids[i % len(train_ids)], "kind": "reasoning", "answer": f"calm {i}"})
             for i in range(max(at, 3))]
    lines[at - 1] = bad_line
    return "\n".join(lines) + "\n"


BAD_FILES = {  # name: (write(path, dataset), where, what the line says)
    "array-line": (lambda path, d: path.write_text(jsonl_with("[1,2,3]", 2, d["train"]["id"])),
                   ":2:", "a list, not an object"),
    "id-list": (lambda path, d: path.write_text(jsonl_with(json.dumps({"id": ["x"], "kind": "reasoning",
                                                                        "answer": "a"}), 1, d["train"]["id"])),
                ":1:", '"id" must be'),
    "garbage-line-385": (lambda path, d: path.write_text(jsonl_with("<<<garbage>>>", 385, d["train"]["id"])),
                         ":385:", "not JSON"),
    "answer-number": (lambda path, d: path.write_text(jsonl_with(json.dumps({"id": d["train"]["id"][0],
                                                                             "kind": "conversation",
                                                                             "answer": 12345}), 3, d["train"]["id"])),
                      ":3:", '"answer" must be a non-empty string, got a number'),
    "official-response-number": (
        lambda path, d: path.write_text(json.dumps([*official_annotations(d)[:2],
                                                    dict(official_annotations(d)[2], gpt_response=5)], indent=4)),
        ": entry [2]:", '"gpt_response" must be'),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_instruction_file_is_one_line_naming_the_file_and_the_line(fi_root, tmp_path, case):
    from emovlm_kd.data import load_image_dataset

    dataset = load_image_dataset(str(fi_root))
    write, where, what = BAD_FILES[case]
    path = tmp_path / ("answers.json" if case.startswith("official") else "answers.jsonl")
    write(path, dataset)
    with pytest.raises(ValueError) as error:
        instructions.read_instruction_file(path, dataset["train"])
    message = str(error.value)
    assert message.startswith(f"{path}{where}") and what in message and "\n" not in message
    assert instructions.instruction_file_problem(path) == message


@pytest.mark.parametrize("case", ["array-line", "official-response-number"])
def test_train_refuses_a_bad_instruction_file_before_any_work(fi_root, tmp_path, capsys, case):
    from emovlm_kd.data import load_image_dataset

    write, where, _ = BAD_FILES[case]
    path = tmp_path / ("answers.json" if case.startswith("official") else "answers.jsonl")
    write(path, load_image_dataset(str(fi_root)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/fi.yaml", "--dataset", str(fi_root), "--instructions", str(path),
              "--output-dir", str(out), *SMALL])
    assert exit_info.value.code == 2
    assert f"--instructions {path}{where}" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_the_annotators_resume_file_skips_rows_of_another_shape(tmp_path):
    """A hand-edited annotations.jsonl: rows that are not {"id", "response"} objects are asked again, not a crash."""
    path = tmp_path / "annotations.jsonl"
    path.write_text('[1, 2]\n{"id": ["x"], "response": "r"}\n{"id": "a.jpg", "response": 5}\n'
                    '{"id": "b.jpg", "label": "awe", "response": "ok"}\n{"id": "c.jpg", "res')
    _, rows = annotate._read_answers(path, ("id", "response"))
    assert [row["id"] for row in rows] == ["b.jpg"]
    assert annotate.parse_annotation(5) is None


def test_image_paths_match_the_longest_id_tail():
    index = instructions.tail_index(["awe/awe_1.jpg", "fear/awe_1.jpg", "train/awe/awe_2.jpg"])
    assert instructions.match_image("/data/images/FI/train/awe/awe_1.jpg", index) == "awe/awe_1.jpg"
    assert instructions.match_image("C:\\FI\\train\\awe\\awe_2.jpg", index) == "train/awe/awe_2.jpg"
    assert instructions.match_image("other/awe_1.jpg", index) is None  # two ids end so: ambiguous
    assert instructions.match_image("awe/awe_3.jpg", index) is None


def test_the_annotator_is_asked_once_per_image_the_official_way_and_resumes(tiny_inputs, tmp_path, monkeypatch):
    from configuration_emovlm_kd import EmoVLMKDConfig
    from emovlm_kd.data import load_image_dataset

    data, vlm, teacher = tiny_inputs
    dataset = load_image_dataset(str(data))
    names = dataset["train"].features["label"].names
    asked = []

    def annotator(image, text):
        asked.append(text)
        return official_response(len(asked))

    monkeypatch.setattr(annotate, "build_annotator", lambda cfg: annotator)
    cfg = tiny_settings(data, vlm, teacher, tmp_path / "run", annotator="openai", instruction_kinds=PAPER_MIX)
    config = EmoVLMKDConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    path = instructions.run_stage0(cfg.instruction_args, tmp_path / "run", dataset, config)
    assert len(asked) == len(dataset["train"])  # one request per image for both answers
    label = names[dataset["train"][0]["label"]]
    assert f"Emotion information for this image: {label}" in asked[0] and ", ".join(names) in asked[0]
    assert "Do not name the emotion category" in asked[0] and "1. key elements" in asked[0]
    assert instructions.instruction_mix(path) == {"categorical": 32, "conversation": 32, "reasoning": 32,
                                                  "train_images": 32}
    (tmp_path / "run" / "stage0_instructions" / "DONE.json").unlink()
    instructions.run_stage0(cfg.instruction_args, tmp_path / "run", dataset, config)
    assert len(asked) == 32  # every image already answered: nothing asked again


# ---------------------------------------------------------------------------------------------------------------
# End to end: the FI paper config with the official JSON trains on all three kinds
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_the_fi_config_with_instructions_trains_on_all_three_kinds(fi_root, tmp_path):
    from emovlm_kd.data import load_image_dataset

    dataset = load_image_dataset(str(fi_root))  # the split the run draws (same seed, same protocol)
    path = tmp_path / "FI_annotations_train.json"
    path.write_text(json.dumps(official_annotations(dataset)))
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/fi.yaml", "--dataset", str(fi_root), "--output-dir", str(out),
                 "--instructions", str(path), *SMALL]) == 0
    images = len(dataset["train"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["instruction_mix"] == {"categorical": images, "conversation": images, "reasoning": images,
                                          "train_images": images}
    assert results["gate_data"]["protocol"] == "sampled" and results["gate_data"]["samples_per_image"] == 2
    rows = [json.loads(line) for line in (out / "stage0_instructions" / "instructions.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == set(PAPER_MIX) and len(rows) == 3 * images
    card = (out / "model" / "README.md").read_text().replace("\n", " ")
    assert f"{images} categorical, {images} conversation, {images} reasoning" in card
