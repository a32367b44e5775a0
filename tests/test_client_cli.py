"""The command line on top of the client: generate / infill / midi with --server, batch jobs,
the live view, and the in-process fallback. Runs `unmask.cli.main` in this process."""

from __future__ import annotations

import io
import json

import mido
import pytest

from unmask.cli import main
from unmask.service.server import ServerThread
from unmask.settings import Settings

FAST = ["--length", "8", "--steps", "2"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from unmask.models.generation import Generator

    with ServerThread(Settings(), generator=Generator.load(tiny_model_dir)) as srv:
        yield srv


@pytest.fixture
def target(server):
    return f"127.0.0.1:{server.port}"


def test_generate_through_the_server_prints_output_and_usage(target, capsys):
    assert main(["generate", "--server", target, "--prompt", "Hello", "--json", *FAST]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["output"].startswith("Hello") and record["usage"]["generated_tokens"] == 8


def test_infill_through_the_server_keeps_the_template(target, capsys):
    assert main(["infill", "--server", target, "a [MASK:3] b", "--steps", "2"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("a ") and out.endswith(" b")


def test_stream_shows_the_canvas_step_by_step(target, capsys):
    args = ["generate", "--server", target, "--prompt", "Hi", "--stream", "--length", "8",
            "--steps", "4", "--block-length", "4"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4 and "░" in lines[0] and "░" not in lines[-1]


def test_midi_from_settings_writes_a_file_and_a_piano_roll(target, tmp_path, capsys):
    out = tmp_path / "song.mid"
    args = ["midi", "--server", target, "--out", str(out), "--png", "--time-signature", "3/4",
            "--tempo", "90", "--voices", "2", "--n-bars", "2", "--length", "24", "--steps", "4",
            "--seed", "3"]  # fmt: skip
    assert main(args) == 0
    mf = mido.MidiFile(file=io.BytesIO(out.read_bytes()))
    assert any(m.type == "note_on" for t in mf.tracks for m in t)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 100


def test_midi_runs_in_process_without_a_server(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("UNMASK_SERVER", raising=False)
    out = tmp_path / "local.mid"
    args = ["midi", "--model", str(tiny_model_dir), "--out", str(out), "--n-bars", "1",
            "--length", "16", "--steps", "2", "--seed", "1"]  # fmt: skip
    assert main(args) == 0
    assert out.read_bytes().startswith(b"MThd")


def test_errors_are_one_line_and_exit_status_2(target, capsys):
    assert main(["generate", "--server", target, "--model", "nope", *FAST]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["generate", "--server", target, "--top-p", "2", *FAST]) == 2
    assert "top_p" in capsys.readouterr().err


def test_batch_submit_status_results_cancel(target, tmp_path, capsys):
    jsonl = tmp_path / "in.jsonl"
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/generate",
             "body": {"modality": "text", "prompt": f"Row {i}", "params": {"gen_length": 8,
                                                                          "steps": 2}}}
            for i in range(3)]  # fmt: skip
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["batch", "submit", str(jsonl), "--server", target, "--wait",
                 "--idempotency-key", "cli-1"]) == 0  # fmt: skip
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "completed" and job["counts"]["succeeded"] == 3
    assert main(["batch", "submit", str(jsonl), "--server", target,
                 "--idempotency-key", "cli-1"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["id"] == job["id"]
    assert main(["batch", "status", job["id"], "--server", target]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["total"] == 3
    assert main(["batch", "results", job["id"], "--server", target]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["r0", "r1", "r2"]
    assert all(r["response"]["text"].startswith("Row") for r in out)
    assert main(["batch", "cancel", job["id"], "--server", target]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"  # already done: kept
    assert main(["batch", "list", "--server", target]) == 0
    assert job["id"] in capsys.readouterr().out


def test_a_bad_batch_line_names_the_line(target, tmp_path, capsys):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"custom_id": "a", "body": {"prompt": "x", "bogus": 1}}) + "\n")
    assert main(["batch", "submit", str(jsonl), "--server", target]) == 2
    assert "line 1" in capsys.readouterr().err


def test_health_command_exits_0_when_serving(target, capsys):
    assert main(["health", "--server", target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


# ---- one line + exit 2 for what a user gets wrong, checked before the work is sent ----------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["generate", "--prompt-file", "/no/such/prompt.txt"], "--prompt-file: no such file"),
        (["generate", "--prompt", "x", "--out", "/no/such/dir/out.txt"], "does not exist"),
        (["midi", "--midi", "/no/such.mid", "--out", "x.mid"], "--midi: no such file"),
        (["infill", "a [MASK:abc] b"], "[MASK:abc] is not a gap"),
        (["infill", "--template-file", "/no/such.txt"], "--template-file: no such file"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line_and_exit_2(target, capsys, args, says):
    assert main([*args, "--server", target, *FAST]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_an_unwritable_out_is_refused_before_anything_is_sent(target, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, says in ((a_file / "o.txt", "does not exist"), (tmp_path, "is a directory")):
        args = ["generate", "--server", "127.0.0.1:1", "--prompt", "x", "--out", str(out)]
        assert main([*args, *FAST]) == 2  # port 1: had it been sent, UNAVAILABLE would say so
        err = capsys.readouterr().err
        assert says in err and "UNAVAILABLE" not in err, err


def test_remote_commands_and_help_import_no_torch(target):
    """`unmask --help`, `unmask generate --server` and `unmask infill --server` are thin."""
    import subprocess
    import sys

    probe = ("import sys, unmask.cli as c\n"
             "try:\n    rc = c.main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', rc, file=sys.stderr)\n")  # fmt: skip
    for args in (["--help"], ["generate", "--help"],
                 ["generate", "--server", target, "--prompt", "Hi", *FAST],
                 ["infill", "--server", target, "a [MASK:2] b", "--steps", "2"]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.stderr.strip().endswith("NO_TORCH 0"), (args, proc.stderr[-500:])


def test_batch_results_into_a_closed_pipe_exit_quietly(target, tmp_path):
    """`unmask batch results ID | head -1` prints one line; the CLI ends without a traceback."""
    import subprocess
    import sys

    from unmask.client import Client

    rows = [{"custom_id": f"p{i}", "body": {"prompt": f"P{i}", "params": {"gen_length": 8,
             "steps": 2}}} for i in range(40)]  # fmt: skip
    with Client(target) as c:
        batch = c.wait_batch(c.submit_batch(rows).id, timeout=120)
    cmd = f"{sys.executable} -m unmask batch results {batch.id} --server {target} | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.stdout.count("\n") == 1 and json.loads(proc.stdout)["custom_id"].startswith("p")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_cli_grpc_batch_and_in_process_give_the_same_output(target, tiny_model_dir, capsys,
                                                            monkeypatch):  # fmt: skip
    """One request path: unset knobs are resolved by the model in one place, whichever door
    the request came in by (sampling at temperature 1, so a stray default would show)."""
    from unmask.client import Client

    monkeypatch.delenv("UNMASK_SERVER", raising=False)
    knobs = {"gen_length": 12, "temperature": 1.0, "seed": 7, "block_length": 4}
    flags = ["--prompt", "Same", "--length", "12", "--temperature", "1", "--seed", "7",
             "--block-length", "4", "--json"]  # fmt: skip
    outputs = {}
    assert main(["generate", "--server", target, *flags]) == 0
    outputs["cli --server"] = json.loads(capsys.readouterr().out)["output"]
    assert main(["generate", "--model", str(tiny_model_dir), *flags]) == 0
    outputs["cli in-process"] = json.loads(capsys.readouterr().out)["output"]
    with Client(target) as c:
        outputs["grpc"] = c.generate("Same", **knobs).text
        batch = c.wait_batch(c.submit_batch([{"custom_id": "a", "body": {
            "prompt": "Same", "params": knobs}}]).id, timeout=60)  # fmt: skip
        outputs["batch"] = next(iter(c.batch_results(batch.id)))["response"]["text"]
    assert len(set(outputs.values())) == 1, outputs


def test_a_refusal_reads_the_same_from_the_server_and_in_process(target, tiny_model_dir, capsys):
    args = ["generate", "--prompt", "x " * 400, "--length", "64"]
    assert main([*args, "--server", target]) == 2
    remote = capsys.readouterr().err
    assert main([*args, "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err == remote
    assert remote.startswith("unmask: error: INVALID_ARGUMENT: prompt: is ")


def test_a_batch_item_setting_only_block_length_gets_the_model_defaults(target, tmp_path, capsys):
    """It used to fail with "params.steps: must be in [128, 128], got 64": a field the caller
    never set."""
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps({"custom_id": "b", "body": {"prompt": "x",
                                 "params": {"block_length": 1}}}) + "\n")  # fmt: skip
    assert main(["batch", "submit", str(jsonl), "--server", target, "--wait"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["succeeded"] == 1
