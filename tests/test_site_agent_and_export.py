"""The site agent's checks before it connects, the operator helpers' files, and export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedlora.client.site_agent import SiteError, SiteSettings, supernode_command, validate_site
from fedlora.client.site_keys import create_site_key
from fedlora.cli import main
from fedlora.server.certificates import create_certificates
from tests.helpers.site_data import write_site_data


@pytest.fixture
def site(tmp_path, tiny_models) -> SiteSettings:
    certs = create_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    key, _ = create_site_key(tmp_path / "keys", "site-a")
    return SiteSettings(superlink="127.0.0.1:9093", data_path=write_site_data(tmp_path / "notes.jsonl"),
                        state_dir=tmp_path / "state", model_path=str(tiny_models["bert"]), max_epsilon=5.0,
                        root_cert=certs["ca.pem"], key=key)


def test_a_valid_site_passes_and_its_supernode_gets_tls_auth_and_node_config(site):
    validate_site(site)
    command = supernode_command(site)
    assert command[command.index("--root-certificates") + 1] == str(site.root_cert)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(site.key)
    node_config = command[command.index("--node-config") + 1]
    assert f'data-path="{site.data_path}"' in node_config and f'state-dir="{site.state_dir}"' in node_config
    assert "max-epsilon=5.0" in node_config and "--insecure" not in command


@pytest.mark.parametrize("change, message", [
    ({"data_path": Path("/nonexistent/notes.jsonl")}, "--data-path: data file /nonexistent/notes.jsonl: does not exist"),
    ({"model_path": "/nonexistent/model"}, "--model-path: model.path '/nonexistent/model': not a local Hugging Face model folder"),
    ({"root_cert": None}, "--root-cert is required"),
    ({"max_epsilon": -1.0}, "--max-epsilon must be > 0"),
])
def test_bad_site_settings_are_one_line_errors(site, change, message):
    for name, value in change.items():
        setattr(site, name, value)
    with pytest.raises(SiteError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate_site(site)


def _model_copy(tiny_bert: Path, folder: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_bert, folder))


@pytest.mark.parametrize("break_it, message", [
    (lambda m: (m / "config.json").write_text("{not json"), "config.json: does not load"),
    (lambda m: (m / "config.json").write_text('{"hidden_size": 8}'), "config.json: no 'model_type'"),
    (lambda m: (m / "tokenizer.json").unlink(), "no tokenizer files (one of tokenizer.json, vocab.txt"),
    (lambda m: (m / "tokenizer.json").write_text('{"model": 3}'), "tokenizer.json: does not load"),
    (lambda m: (m / "model.safetensors").unlink(), "no weight files"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\x10" * 64), "model.safetensors: weights do not open"),
])
def test_a_broken_model_folder_is_named_in_one_line_without_importing_torch(site, tmp_path, tiny_models, break_it, message):
    """The site's model check parses each file a load reads, and names the one that is broken."""
    model = _model_copy(tiny_models["bert"], tmp_path / "model")
    break_it(model)
    site.model_path = str(model)
    with pytest.raises(SiteError, match=f"--model-path: .*{message.replace('(', '[(]').replace('.', '[.]')}"):
        validate_site(site)


def test_the_model_check_passes_what_transformers_loads_and_imports_no_torch(tiny_models, tmp_path):
    import subprocess
    import sys

    from transformers import AutoConfig, AutoTokenizer

    # The tiny models (fast tokenizers) and a folder with only a slow tokenizer's vocab.txt.
    slow = _model_copy(tiny_models["bert"], tmp_path / "slow-tokenizer")
    vocab = json.loads((slow / "tokenizer.json").read_text())["model"]["vocab"]
    (slow / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)))
    (slow / "tokenizer.json").unlink()
    folders = [*map(str, tiny_models.values()), str(slow), "default"]
    for folder in folders[:-1]:
        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    script = ("import sys; from fedlora.model_folder import check_model_files, resolve_model_dir\n"
              f"for f in {folders!r}: check_model_files(resolve_model_dir(f))\n"
              "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_bad_key_data_format_and_state_dir(site, tmp_path):
    (tmp_path / "not-a-key").write_text("hello")
    site.key = tmp_path / "not-a-key"
    with pytest.raises(SiteError, match="not an OpenSSH private key"):
        validate_site(site)
    site.key = None
    (tmp_path / "notes.txt").write_text("a,b\n")
    site.data_path = tmp_path / "notes.txt"
    with pytest.raises(SiteError, match="unknown format"):
        validate_site(site)
    site.data_path = write_site_data(tmp_path / "ok.jsonl")
    if os.geteuid() != 0:  # root writes anywhere
        site.state_dir = Path("/proc/fedlora-state")
        with pytest.raises(SiteError, match="--state-dir"):
            validate_site(site)
    site.state_dir = tmp_path / "state"
    site.state_dir.mkdir(exist_ok=True)
    (site.state_dir / "privacy-ledger.json").write_text("{broken")
    with pytest.raises(SiteError, match="unreadable"):
        validate_site(site)


def test_client_command_exits_2_with_one_line_before_connecting(site, capsys):
    code = main(["client", "--coordinator", "127.0.0.1:1", "--root-cert", str(site.root_cert), "--data-path", "/nope.jsonl",
                 "--state-dir", str(site.state_dir), "--max-epsilon", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--data-path" in err


def test_certificates_and_keys_are_what_tls_and_flower_expect(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    certs = create_certificates(tmp_path / "certs", ["coordinator.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(certs["ca.pem"].read_bytes())
    server = x509.load_pem_x509_certificate(certs["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert oct(certs["server.key"].stat().st_mode)[-3:] == "600"
    with pytest.raises(FileExistsError):
        create_certificates(tmp_path / "certs", ["localhost"])

    private, public = create_site_key(tmp_path / "keys", "hospital-a")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()


def test_export_adapter_and_merged_model(tmp_path, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.adapter_state import adapter_of, write_peft_dir
    from fedlora.base_model import build_peft_model
    from fedlora.config import load_config, write_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config(None, {"model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(run_dir)})
    write_config(config, run_dir / "config.toml")
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=0)
    adapter = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_of(model).items()}  # a trained-looking adapter
    write_peft_dir(model, adapter, run_dir / "adapter", tiny_models["bert"])

    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter-out")]) == 0
    assert json.loads((tmp_path / "adapter-out" / "labels.json").read_text()) == ["a", "b", "c"]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=3)
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter-out")).eval()

    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 2  # never overwrites


def test_node_config_reaches_flower_as_written_and_odd_paths_are_refused(site, tmp_path):
    from flwr.common.config import parse_config_args

    (tmp_path / "site a (2024)").mkdir()
    site.data_path = write_site_data(tmp_path / "site a (2024)" / "notes.jsonl")
    parsed = parse_config_args([site.node_config()])
    assert parsed["data-path"] == str(site.data_path) and parsed["max-epsilon"] == 5.0
    odd = tmp_path / 'site "a"'
    odd.mkdir()
    site.data_path = write_site_data(odd / "notes.jsonl")
    with pytest.raises(SiteError, match="double quote"):
        validate_site(site)


def test_fingerprint_covers_the_weights_not_files_saved_beside_them(tiny_models, tmp_path):
    import shutil

    from fedlora.base_fingerprint import model_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_models["bert"], copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_models["bert"])
    (copy / "optimizer.pt").write_bytes(b"not the model")
    assert model_fingerprint(copy) == model_fingerprint(tiny_models["bert"])
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(tiny_models["bert"])


def tls_server(certs: dict[str, Path]):
    """A TLS server on 127.0.0.1 with a coordinator certificate, as the SuperLink presents
    it; returns (address, stop). It completes handshakes and closes."""
    import socket
    import ssl
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.pem"], certs["server.key"])
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopped = threading.Event()

    def serve() -> None:
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join()
        listener.close()

    return f"127.0.0.1:{listener.getsockname()[1]}", stop


def test_root_cert_must_be_a_valid_ca_that_signed_the_coordinators_certificate(site, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ours = create_certificates(tmp_path / "ours", ["localhost", "127.0.0.1"])
    other = create_certificates(tmp_path / "other", ["localhost", "127.0.0.1"])
    address, stop = tls_server(ours)
    try:
        site.superlink, site.root_cert = address, ours["ca.pem"]
        validate_site(site)  # the coordinator's certificate is signed by the CA given
        site.root_cert = other["ca.pem"]  # a CA from another `fedlora certs` run
        with pytest.raises(SiteError, match=rf"the coordinator at {address} presents a certificate this CA does not vouch for"):
            validate_site(site)
    finally:
        stop()

    site.root_cert = ours["server.pem"]  # the coordinator's own certificate, not the CA's
    with pytest.raises(SiteError, match="not a CA certificate"):
        validate_site(site)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=400))
               .not_valid_after(now - datetime.timedelta(days=35))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    site.root_cert = tmp_path / "expired-ca.pem"
    site.root_cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(SiteError, match=r"expired-ca\.pem: expired on \d{4}-\d\d-\d\d"):
        validate_site(site)


def test_a_data_file_without_the_text_column_names_the_columns_it_has(site, tmp_path):
    site.data_path = tmp_path / "notes.csv"
    site.data_path.write_text("note,department\nchest pain,cardiology\n")
    with pytest.raises(SiteError) as caught:
        validate_site(site)
    assert str(caught.value) == (f"--data-path {site.data_path}: row 1 has no column 'text' (--text-column) and no columns "
                                 "'prompt' and 'response' (--prompt-column, --response-column); the row has columns "
                                 "'note', 'department'")


def test_a_site_with_peer_keys_says_how_many_it_loaded(site, tmp_path, monkeypatch, capsys):
    from fedlora.client import site_agent

    peers = [create_site_key(tmp_path / "keys", name)[1] for name in ("site-b", "site-c")]
    site.peer_keys = tmp_path / "peers.pub"
    lines = [Path(f"{site.key}.pub").read_text().strip(), "# the consortium's other sites", *(p.read_text().strip() for p in peers)]
    site.peer_keys.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(site_agent, "supervise", lambda commands, env, while_running, **_: 0)  # no SuperNode here
    site_agent.run_site(site)
    assert f"[fedlora] loaded 3 peer keys from {site.peer_keys}\n" in capsys.readouterr().out
