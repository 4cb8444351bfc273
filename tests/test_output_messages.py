"""What runs print: a line per answered prompt and what inference wrote, progress lines for log files, third-party
warnings hidden unless debugging, and the loss terms and learning rate in TensorBoard."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import TensorBoardStatsHandler

from custom.clinical.dicom_series import ClinicalInputWarning
from custom.clinical.outputs import ReferringOutputWriter
from custom.data.synthetic import generate_dataset
from custom.handlers import AnswerReport, TrainingScalars, answer_line, wrote_line
from custom.losses import LSMSLoss
from custom.runtime import ProgressLog, ThirdPartyWarnings, format_duration, quiet_third_party


def volume(values: np.ndarray, path: str) -> MetaTensor:
    return MetaTensor(
        torch.as_tensor(values[None], dtype=torch.float32), affine=torch.eye(4), meta={"filename_or_obj": path}
    )


@pytest.fixture
def records(tmp_path):
    """Records of three answered prompts over two cases, written by the bundle's writer under tmp_path/out."""
    shape = (24, 24, 6)
    hu = np.full(shape, 40.0)
    found = np.zeros(shape)
    found[8:14, 8:14, 2:4] = 1.0
    writer = ReferringOutputWriter(tmp_path / "out")
    answers = [
        ("case_a", "the largest lesion", found, {"found": True, "confidence": 0.912}),
        ("case_a", "a lesion in the spleen", np.zeros(shape), {"found": False, "confidence": 0.95, "reason": "spleen"}),
        ("case_b", "the largest lesion", found, {"found": True, "confidence": 0.5}),
    ]
    results = []
    for case_id, text, probabilities, decision in answers:
        image = volume(hu, f"/data/{case_id}.nii.gz")
        image.meta.update({"original_affine": np.eye(4), "spatial_shape": np.array(shape)})
        results.append(writer(image, volume(probabilities, ""), text, case_id=case_id, decision=decision)["record"])
    return results


def run_report(records, output_dir, engine_lines=False):
    """An engine that gives one record per iteration, with an :class:`AnswerReport` attached."""
    engine = Engine(lambda engine, batch: [{"record": batch}])
    level = engine.logger.level
    try:
        AnswerReport(output_dir, engine_lines=engine_lines).attach(engine)
        engine.run(records, max_epochs=1)
    finally:
        engine.logger.setLevel(level)


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_inference_logs_a_line_per_prompt_and_ends_with_what_it_wrote(records, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_report(records, tmp_path / "out")
    lines = messages(caplog)
    assert re.fullmatch(r'\[1/3\] case_a "the largest lesion": found, 1 lesion, confidence 0\.91, \d+\.\d s', lines[0])
    assert lines[1].startswith('[2/3] case_a "a lesion in the spleen": not present (spleen), confidence 0.95, ')
    assert lines[2].startswith('[3/3] case_b "the largest lesion": found, 1 lesion, confidence 0.50, ')
    assert lines[-1].startswith(f"wrote 3 answers (9 files) in 2 folders under {tmp_path / 'out'}: case_a, case_b (")
    assert not any("Engine run" in line for line in lines)  # the run ends with the "wrote" line


def test_one_answer_names_its_files(records, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_report(records[:1], tmp_path / "out", engine_lines=True)
    wrote = next(line for line in messages(caplog) if line.startswith("wrote"))
    folder = tmp_path / "out" / "case_a"
    head, names = re.fullmatch(r"wrote 1 answer \(3 files\) in (\S+): (.+) \(\d+\.\d s\)", wrote).groups()
    assert Path(head) == folder and all((folder / name).is_file() for name in names.split(", "))
    assert any("Engine run" in line for line in messages(caplog))  # kept on request (--debug true)


def test_answer_and_wrote_lines():
    record = {"case_id": "c1", "expression": "x", "found": False, "confidence": None, "n_lesions": 0}
    assert answer_line(record, 1.25) == 'c1 "x": not present, confidence n/a, 1.2 s'
    assert wrote_line("out", [], 0) == "wrote nothing to out"
    files = [Path("out") / f"case_{k}" / "a.json" for k in range(5)]
    assert wrote_line("out", files, 5) == (
        "wrote 5 answers (5 files) in 5 folders under out: case_0, case_1, case_2 and 2 more"
    )


@pytest.fixture
def restored_output_settings():
    """Warning filters, root-handler filters and the transformers settings as they were before the test."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, ThirdPartyWarnings)]:
            handler.removeFilter(f)
    transformers_logging.set_verbosity(verbosity)
    if bars:
        transformers_logging.enable_progress_bar()


def shown(module: str, category=UserWarning) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("a note", category, "file.py", 1, module=module, registry={})
    return bool(caught)


def test_third_party_warnings_are_hidden_unless_debugging(restored_output_settings):
    warnings.simplefilter("always")
    assert quiet_third_party(debug="true") is False
    assert shown("monai.transforms.spatial.dictionary", FutureWarning) and shown("transformers.modeling_utils")
    assert quiet_third_party() is True
    for module in ("monai.data.meta_tensor", "monai", "torch.nn.modules.module", "transformers.modeling_utils"):
        assert not shown(module)
    assert not shown("custom.transforms", FutureWarning) and not shown("custom.transforms", DeprecationWarning)
    assert shown("custom.clinical.dicom_series", ClinicalInputWarning) and shown("custom.training")
    assert shown("monaix", UserWarning)  # another package whose name merely starts like one


def test_third_party_warning_log_records_are_hidden(restored_output_settings):
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        quiet_third_party(False)
        quiet_third_party(False)  # once per handler, however often it is called
        assert sum(isinstance(f, ThirdPartyWarnings) for f in handler.filters) == 1
        for name, level in [
            ("monai.data.nvimgcodec_pydicom_plugin", logging.WARNING),
            ("ignite.engine.engine.SupervisedTrainer", logging.INFO),
            ("monai.bundle", logging.ERROR),
            ("custom.training", logging.WARNING),
        ]:
            handler.handle(logging.LogRecord(name, level, __file__, 1, "message", None, None))
    finally:
        root.removeHandler(handler)
    assert [(r.name, r.levelno) for r in seen] == [
        ("ignite.engine.engine.SupervisedTrainer", logging.INFO),
        ("monai.bundle", logging.ERROR),
        ("custom.training", logging.WARNING),
    ]


def test_progress_lines_count_items_and_time_left(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("custom.runtime.time.perf_counter", lambda: now[0])
    lines = []
    progress = ProgressLog(25, "generating cases", "cases", log=lines.append)
    for _ in range(25):
        now[0] += 1.0  # one second per item
        progress.update(note="ok")
    assert len(lines) == 9  # every 3 (a tenth, rounded up) and at the last
    assert lines[0] == "generating cases: 3 of 25 cases, 3.0 s, about 22.0 s left; ok"
    assert lines[-1] == "generating cases: 25 of 25 cases, 25.0 s; ok"
    assert [format_duration(s) for s in (4.24, 185, 3720)] == ["4.2 s", "3 min 05 s", "1 h 02 min"]


def test_dataset_generation_logs_its_progress(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="custom.data.synthetic")
    generate_dataset(tmp_path / "data", num_cases=3, progress=False)
    lines = [line for line in messages(caplog) if line.startswith("generating cases")]
    assert [line.split(",")[0] for line in lines] == [f"generating cases: {k} of 3 cases" for k in (1, 2, 3)]


def network_output(batch=2, embedding=8) -> dict:
    torch.manual_seed(0)
    return {
        "logits": torch.randn(batch, 3, 16, 16, requires_grad=True),
        "pixel_embeddings": torch.randn(batch, embedding, 8, 8, requires_grad=True),
        "sentence_embedding": torch.randn(batch, embedding, requires_grad=True),
    }


def training_target(batch=2) -> torch.Tensor:
    target = torch.zeros(batch, 3, 16, 16)
    target[:, 0, 4:8, 4:8] = 1
    target[:, 1, 2:14, 2:14] = 1
    target[:, 2, 4:10, 4:10] = 1
    return target


def test_loss_terms_add_up_to_the_loss():
    loss_fn = LSMSLoss(contrastive_weight=0.1, dense_weight=0.5, small_lesion_weight=0.2)
    loss = loss_fn(network_output(), training_target())
    assert list(loss_fn.terms) == ["referred", "liver", "lesions", "small_lesions", "contrastive"]
    assert not any(value.requires_grad for value in loss_fn.terms.values())
    assert torch.isclose(sum(loss_fn.terms.values()), loss.detach())
    one_channel = LSMSLoss()
    one_channel(network_output()["logits"][:, :1], training_target()[:, :1])  # logits only: no contrastive term
    assert list(one_channel.terms) == ["referred"]


def test_tensorboard_gets_each_loss_term_and_the_learning_rate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    weights = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weights], lr=0.01)
    loss_fn = LSMSLoss()

    def step(engine, batch):
        output = network_output()
        output["logits"] = output["logits"] + weights
        loss = loss_fn(output, training_target())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return [{"loss": loss.detach()}, {"loss": loss.detach()}]  # decollated, as MONAI's trainer gives it

    trainer = Engine(step)
    TensorBoardStatsHandler(
        log_dir=str(tmp_path), epoch_log=False, output_transform=TrainingScalars(loss_fn, optimizer)
    ).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=1)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train_loss", "learning_rate"} | {
        f"loss/{t}" for t in ("referred", "liver", "lesions", "contrastive")
    }
    assert [e.step for e in events.Scalars("loss/referred")] == [1, 2, 3]
    assert events.Scalars("learning_rate")[0].value == pytest.approx(0.01)
