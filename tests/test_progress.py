"""Progress reports: a tqdm bar on a terminal, a plain line at most every interval elsewhere."""

import io

from tiny import tiny_data, tiny_model
from tqdm.auto import tqdm

from iwae.evaluate import log_weight_reductions
from iwae.progress import LineProgress, progress_bar


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_at_most_one_per_interval():
    stream, clock = io.StringIO(), FakeClock()
    bar = LineProgress(800, "L_5000", "ex", stream, interval=30.0, clock=clock)
    for _ in range(800):  # 800 updates, one every 0.125 s: 100 s in all
        clock.now += 0.125
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 100 s at one line per 30 s: lines after 30, 60 and 90 s, then the final line
    assert len(lines) == 4, lines
    assert lines[0] == "L_5000: 240/800 ex, 8 ex/s, ETA 1:10", lines[0]
    assert lines[2] == "L_5000: 720/800 ex, 8 ex/s, ETA 0:10"
    assert lines[3] == "L_5000: 800/800 ex in 1:40 (8 ex/s)"


def test_interval_zero_writes_every_update_and_the_postfix():
    stream, clock = io.StringIO(), FakeClock()
    with LineProgress(3, "runs", "run", stream, interval=0, clock=clock) as bar:
        for name in ("a", "b", "c"):
            clock.now += 2.0
            bar.set_postfix_str(f"{name}: done")
            bar.update(1)
    assert stream.getvalue().splitlines() == [
        "runs: 1/3 run, 0.5 run/s, ETA 0:04 [a: done]",
        "runs: 2/3 run, 0.5 run/s, ETA 0:02 [b: done]",
        "runs: 3/3 run, 0.5 run/s, ETA 0:00 [c: done]",
        "runs: 3/3 run in 0:06 (0.5 run/s) [c: done]",
    ]


def test_a_terminal_gets_tqdm_a_file_plain_lines_and_quiet_nothing():
    bar = progress_bar(10, "x", stream=Terminal())
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert isinstance(progress_bar(10, "x", stream=io.StringIO()), LineProgress)
    stream = Terminal()
    quiet = progress_bar(10, "x", enabled=False, stream=stream)
    quiet.update(5)
    quiet.close()
    assert isinstance(quiet, tqdm) and quiet.disable and stream.getvalue() == ""


def test_evaluation_progress_off_a_terminal_has_no_carriage_returns(monkeypatch, capsys):
    """log_weight_reductions' progress on a redirected stderr: plain lines only."""
    monkeypatch.setattr("iwae.progress.INTERVAL", 0.0)
    log_weight_reductions(
        tiny_model(), tiny_data(n=6), k=8, max_rows=16, progress=True
    )  # 3 chunks of 2 examples
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines[:3]] == [
        "L_8: 2/6 ex",
        "L_8: 4/6 ex",
        "L_8: 6/6 ex",
    ]
    assert len(lines) == 4 and lines[3].startswith("L_8: 6/6 ex in 0:00 (")
