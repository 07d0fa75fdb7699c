"""Every bad data file is a one-line error (exit 2 from the CLI) that names the file and
the line where there is one, and never quotes a value from the file: the message may be
shown far from the data (a coordinator's log, a terminal on another machine). The one
exception is the simulation driver's label check (simulations/label_check.py): it reads
the user's own file on the user's machine before anything runs, and names the label to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.client.site_data import load_site_data
from fedlora.cli import main
from fedlora.config import ConfigError, load_config
from fedlora.simulations.engine_network import ENGINE_ENV, IN_PROCESS
from fedlora.text_data import DataError, read_rows


@pytest.fixture(autouse=True)
def _simulate_in_process(monkeypatch):
    """`fedlora simulate` checks its inputs in this process, not in an engine child
    (simulations/engine_network.py), so that capsys sees the one-line errors."""
    monkeypatch.setenv(ENGINE_ENV, IN_PROCESS)


SECRET = "Jane Doe"  # stands for a patient's data: no message may contain it


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def simulate_error(capsys, dataset: Path) -> str:
    """The CLI's one-line error for `fedlora simulate` on `dataset` (exit code 2)."""
    code = main(["simulate", "--set", f"simulation.dataset={dataset}", "--set", "simulation.clients=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(dataset) in err and SECRET not in err
    return err


BAD_FILES = [  # (name, content, what the message says)
    ("latin1.csv", f"text,label\n{SECRET},a\ncaf\xe9 au lait,b\n".encode("latin-1"), "line 3 is not UTF-8 text"),
    ("binary.jsonl", b'{"text": "' + SECRET.encode() + b'", "label": "a"}\n\x00\x01\x02PK\x03\x04\n', "line 2 holds a NUL byte"),
    ("quote.csv", f'text,label\n{SECRET},a\n"unterminated,b\nmore text,c\n', "line 3: not valid CSV (unexpected end of data)"),
    ("wide.csv", f"text,label\n{SECRET},a\nx,b,{SECRET}\n", "line 3 has 3 fields, the header has 2"),
    ("header.csv", f"text,text\n{SECRET},a\n", "line 1: the header has an empty or repeated column name"),
    ("empty-text.jsonl", json.dumps({"text": SECRET, "label": "a"}) + "\n\n" + json.dumps({"text": "  ", "label": "b"}) + "\n",
     "row 2 (line 3): column 'text' is empty"),
    ("null-label.jsonl", json.dumps({"text": SECRET, "label": "a"}) + "\n" + json.dumps({"text": "x", "label": None}) + "\n",
     "row 2 (line 2): column 'label' is empty"),
    ("short-row.csv", f"text,label\n{SECRET},a\nshort\n", "row 2 (line 3): column 'label' is empty"),
    ("empty-field.csv", f'text,label\n{SECRET},a\n"multi\nline",b\n,c\n', "row 3 (line 5): column 'text' is empty"),
    ("one-label.jsonl", "".join(json.dumps({"text": f"{SECRET} {i}", "label": "cardiology"}) + "\n" for i in range(20)),
     "column 'label' has 1 distinct value(s); classification needs at least 2"),
]


@pytest.mark.parametrize("name, content, says", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_is_one_line_naming_the_file_and_line(tmp_path, capsys, name, content, says):
    err = simulate_error(capsys, write(tmp_path / name, content))
    assert says in err


def test_good_csv_quoting_and_a_byte_order_mark_read_with_their_lines(tmp_path):
    rows = read_rows(write(tmp_path / "ok.csv", b'\xef\xbb\xbftext,label\n"two\nlines, quoted",a\n\nplain,b\n'))
    assert list(rows) == [{"text": "two\nlines, quoted", "label": "a"}, {"text": "plain", "label": "b"}]
    assert rows.lines == [2, 5]


def test_a_label_outside_data_labels_names_the_line_not_the_value(tmp_path):
    path = write(tmp_path / "site.jsonl", json.dumps({"text": "note", "label": "a"}) + "\n" + json.dumps({"text": "note", "label": SECRET}) + "\n")
    config = load_config(None, {"data.labels": ["a", "b"]})
    with pytest.raises(DataError) as caught:
        load_site_data(config, ["a", "b"], {"data-path": str(path), "labels": "a,b"}, tokenizer=None)  # before tokenizing
    assert str(caught.value) == f"data file {path}: row 2 (line 2): the value of column 'label' is not one of the site's labels"


def test_one_configured_label_is_a_config_error():
    with pytest.raises(ConfigError, match="'data.labels' lists one label; classification needs at least 2"):
        load_config(None, {"data.labels": ["cardiology"]})


def label_rows(*labels: str) -> str:
    return "".join(json.dumps({"text": f"note {i}", "label": label}) + "\n" for i, label in enumerate(labels))


@pytest.fixture
def no_ray(monkeypatch):
    """The label checks must end the run before the simulation engine starts."""
    import flwr.simulation

    def started(*_args, **_kwargs):
        raise AssertionError("run_simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)


def simulate_labels(capsys, dataset: Path, *settings: str) -> str:
    """`fedlora simulate` on `dataset`: exit 2 and the one line it prints."""
    argv = ["simulate", "--set", f"simulation.dataset={dataset}", "--set", "simulation.clients=2"]
    for setting in settings:
        argv += ["--set", setting]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_label_outside_data_labels_stops_the_simulation_naming_row_column_and_value(tmp_path, capsys, no_ray):
    path = write(tmp_path / "notes.jsonl", label_rows("cardiology", "oncology", "Cardiology", "oncology"))
    err = simulate_labels(capsys, path, 'data.labels=["cardiology", "neurology"]')
    assert err == (f"fedlora: error: data file {path}: row 2 (line 2): column 'label' has 'oncology', "
                   "which is not one of data.labels (cardiology, neurology)")
    err = simulate_labels(capsys, path, 'data.labels=["cardiology", "oncology"]')
    assert err.endswith("row 3 (line 3): column 'label' has 'Cardiology', which is not one of data.labels "
                        "(cardiology, oncology); did you mean 'cardiology'?")


def test_labels_differing_only_in_case_or_space_are_refused_unless_data_labels_lists_both(tmp_path, capsys, no_ray):
    path = write(tmp_path / "notes.csv", "text,label\na,cardiology\nb,oncology\nc,Cardiology\nd,oncology \n")
    err = simulate_labels(capsys, path)
    assert err == (f"fedlora: error: data file {path}: column 'label' has 'cardiology' at row 1 (line 2) and "
                   "'Cardiology' at row 3 (line 4), which differ only in case or surrounding space; make them one "
                   "label in the file, or list both in data.labels to keep them apart")
    spaced = write(tmp_path / "spaced.csv", "text,label\na,cardiology\nb,oncology\nd,oncology \n")
    assert "'oncology' at row 2 (line 3) and 'oncology ' at row 3 (line 4)" in simulate_labels(capsys, spaced)


def test_labels_listing_both_spellings_keep_them_apart(tmp_path):
    from fedlora.simulations.runner import prepare

    path = write(tmp_path / "notes.jsonl", label_rows("cardiology", "oncology", "Cardiology", "oncology"))
    listed = ["Cardiology", "cardiology", "oncology"]
    config = prepare(load_config(None, {"simulation.dataset": str(path), "simulation.clients": 2, "data.labels": listed}))
    assert config.data.labels == listed
    plain = write(tmp_path / "plain.jsonl", label_rows("cardiology", "oncology", "cardiology"))
    config = prepare(load_config(None, {"simulation.dataset": str(plain), "simulation.clients": 2}))
    assert config.data.labels == ["cardiology", "oncology"]
