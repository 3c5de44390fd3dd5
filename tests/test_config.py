"""kvd.config and the kvd console script: defaults, precedence, one-line errors, --check."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvd.address import AddressError, is_loopback_host, parse_address
from kvd.config import Config, format_config, load_config, unknown_env_vars
from kvd.errors import ConfigError
from tests.procs import free_port

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "kvd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_error(*args, **kwargs) -> str:
    """The message of the ConfigError load_config raises; asserts it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults and precedence -------------------------------------------------------------------


def test_defaults_are_valid():
    config = load_config(None, {}, {})
    assert config == Config()
    assert (config.listen, config.peer_listen) == ("127.0.0.1:7379", "127.0.0.1:7380")
    assert (config.n, config.r, config.w) == (3, 2, 2)
    assert config.ring_size == 1024
    assert config.chunk_size == 1024 * 1024 and config.max_frame == 4 * 1024 * 1024
    assert config.seeds == [] and config.cluster_secret_file is None
    assert config.source("n") == "default"


def test_every_field_has_a_description():
    for key, field in Config.model_fields.items():
        assert field.description and len(field.description) > 20, key


def test_file_overrides_defaults(tmp_path):
    path = write(tmp_path, 'n = 5\nr = 3\nseeds = ["a:7380", "[::1]:7380"]\nsync_interval = 2\n')
    config = load_config(path, {}, {})
    assert (config.n, config.r, config.w) == (5, 3, 2)
    assert config.seeds == ["a:7380", "[::1]:7380"]
    assert config.sync_interval == 2.0  # an int is fine where a float is expected
    assert config.source("n") == path


def test_env_overrides_file(tmp_path):
    path = write(tmp_path, 'node_id = "from-file"\nn = 5\n')
    env = {
        "KVD_NODE_ID": "from-env",
        "KVD_N": "4",
        "KVD_SEEDS": "h1:7380, h2:7380",
        "KVD_READ_REPAIR": "off",
        "KVD_PHI_THRESHOLD": "10",
    }
    config = load_config(path, env, {})
    assert config.node_id == "from-env"
    assert config.n == 4
    assert config.seeds == ["h1:7380", "h2:7380"]
    assert config.read_repair is False
    assert config.phi_threshold == 10.0
    assert config.source("n") == "KVD_N"


def test_flags_override_env_and_file(tmp_path):
    path = write(tmp_path, 'node_id = "from-file"\nlisten = "127.0.0.1:8000"\n')
    env = {"KVD_NODE_ID": "from-env", "KVD_LISTEN": "127.0.0.1:8001"}
    flags = {"node_id": "from-flag", "seeds": "a:1,b:2", "data_dir": None}
    config = load_config(path, env, flags)
    assert config.node_id == "from-flag"
    assert config.listen == "127.0.0.1:8001"
    assert config.seeds == ["a:1", "b:2"]
    assert config.data_dir == "/var/lib/kvd"  # None means "flag not given"
    assert config.source("node_id") == "--node-id"


# --- one-line errors naming the key ------------------------------------------------------------


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, 'n = "three"\n')
    assert config_error(path, {}, {}) == f"{path}: n: expected an integer, got 'three'"


def test_no_silent_coercion(tmp_path):
    assert "hinted_handoff: expected true or false" in config_error(
        write(tmp_path, "hinted_handoff = 1\n"), {}, {}
    )
    assert "ring_size: expected an integer, got 1024.0" in config_error(
        write(tmp_path, "ring_size = 1024.0\n"), {}, {}
    )


def test_member_reserved_connections_above_half_of_max_connections_is_refused(tmp_path):
    """kvd.toml(5) says at most half of max_connections; a larger value was clamped
    silently (the peer port then kept fewer slots for members than the operator set)."""
    path = write(tmp_path, "max_connections = 256\nmember_reserved_connections = 600\n")
    message = config_error(path, {}, {})
    assert "member_reserved_connections (600) must be at most half of max_connections" \
        in message, message
    write(tmp_path, "max_connections = 256\nmember_reserved_connections = 128\n")
    assert load_config(path, {}, {}).member_reserved_connections == 128
    # The default is lowered to half in the config itself, so `kvd --check` prints the value
    # the node uses (outside tester: it printed 64 where 50 was used).
    write(tmp_path, "max_connections = 100\n")
    assert load_config(path, {}, {}).member_reserved_connections == 50


def test_unknown_key(tmp_path):
    path = write(tmp_path, "copies = 3\n")
    assert config_error(path, {}, {}) == f"{path}: unknown key 'copies'"
    path = write(tmp_path, "node_idd = 'x'\n")
    assert "did you mean 'node_id'?" in config_error(path, {}, {})


def test_r_greater_than_n(tmp_path):
    assert config_error(None, {"KVD_R": "4"}, {}) == "KVD_R: r (4) must not exceed n (3)"
    path = write(tmp_path, "w = 3\n")
    # The source named is the one with the highest precedence among the keys involved.
    assert config_error(path, {"KVD_N": "2"}, {}) == "KVD_N: w (3) must not exceed n (2)"


def test_bad_env_conversion_names_the_variable():
    message = config_error(None, {"KVD_N": "three"}, {})
    assert message == "KVD_N: n: expected an integer, got 'three'"
    assert "KVD_HINT_WINDOW: hint_window: expected a number" in config_error(
        None, {"KVD_HINT_WINDOW": "3h"}, {}
    )
    assert "KVD_ANTI_ENTROPY: anti_entropy: expected true or false" in config_error(
        None, {"KVD_ANTI_ENTROPY": "maybe"}, {}
    )


@pytest.mark.parametrize(
    "line, key",
    [
        ('listen = "localhost"', "listen"),
        ('listen = "127.0.0.1:70000"', "listen"),
        ('peer_listen = "127.0.0.1:65536"', "peer_listen"),
        ('peer_listen = "::1:7380"', "peer_listen"),
        ('metrics_listen = "no port:1"', "metrics_listen"),
        ('seeds = ["good:1", "bad"]', "seeds"),
    ],
)
def test_bad_address(tmp_path, line, key):
    path = write(tmp_path, line + "\n")
    assert config_error(path, {}, {}).startswith(f"{path}: {key}: ")


def test_bad_sync_literal(tmp_path):
    path = write(tmp_path, 'sync = "always"\n')
    message = config_error(path, {}, {})
    assert message.startswith(f"{path}: sync: expected one of ")
    assert "'always'" in message


def test_toml_syntax_error_has_line_number(tmp_path):
    path = write(tmp_path, 'n = 3\nr = \n')
    message = config_error(path, {}, {})
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message


def test_missing_file(tmp_path):
    path = str(tmp_path / "x.toml")
    assert config_error(path, {}, {}) == f"missing config file {path}"


@pytest.mark.parametrize(
    "line, key",
    [
        ("ring_size = 1000", "ring_size"),
        ("ring_size = 4", "ring_size"),
        ("n = 17", "n"),
        ("r = 0", "r"),
        ("max_frame = 1024", "max_frame"),
        ("chunk_size = 8388608", "chunk_size"),
        ('node_id = "has space"', "node_id"),
        ("sync_interval = 0", "sync_interval"),
        ("gossip_interval = inf", "gossip_interval"),
        ("data_dir = ''", "data_dir"),
        ("[table]\nx = 1", "table"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, line, key):
    path = write(tmp_path, line + "\n")
    assert f"{key}" in config_error(path, {}, {}).split(": ", 2)[1]


def test_addresses_must_not_collide():
    message = config_error(None, {}, {"peer_listen": "127.0.0.1:7379"})
    assert message.startswith("--peer-listen: peer_listen 127.0.0.1:7379 collides with listen")


# --- the non-loopback rule (DESIGN 7) ---------------------------------------------------------


def test_non_loopback_needs_a_secret(tmp_path):
    message = config_error(None, {}, {"peer_listen": "0.0.0.0:7380"})
    assert message == (
        "--peer-listen: peer_listen 0.0.0.0:7380 is not loopback: "
        "set cluster_secret_file so peers must authenticate"
    )
    assert "listen [::]:7379 is not loopback" in config_error(None, {"KVD_LISTEN": "[::]:7379"}, {})
    secret = write(tmp_path, "s3cret", name="secret")
    config = load_config(None, {}, {"peer_listen": "0.0.0.0:7380", "cluster_secret_file": secret})
    assert config.peer_listen == "0.0.0.0:7380"


def test_loopback_forms_need_no_secret():
    for listen in ("127.0.0.1:1", "127.1.2.3:1", "[::1]:1", "localhost:1", "LOCALHOST:1"):
        assert load_config(None, {}, {"listen": listen}).listen == listen
    assert is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("10.0.0.1")
    assert not is_loopback_host("example.com")


def test_secret_file_must_exist(tmp_path):
    missing = str(tmp_path / "nope")
    assert config_error(None, {"KVD_CLUSTER_SECRET_FILE": missing}, {}) == (
        f"KVD_CLUSTER_SECRET_FILE: cluster_secret_file: no such file {missing}"
    )


def test_parse_address():
    assert parse_address("127.0.0.1:7379") == ("127.0.0.1", 7379)
    assert parse_address("[::1]:7380") == ("::1", 7380)
    assert parse_address("node-1.example.com:1") == ("node-1.example.com", 1)
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)  # any free port (tests)
    for bad in ("", ":7379", "host", "host:", "host:x", "host:-1", "[::1]7380", "[nope]:1"):
        with pytest.raises(AddressError):
            parse_address(bad)
    with pytest.raises(ValueError):
        parse_address("host:99999")
    with pytest.raises(ConfigError):
        parse_address("host:99999")


def test_an_address_to_dial_names_the_ports_it_can_have():
    """Outside tester: `cluster join 127.0.0.1:99999` said "port must be 0..65535 (0: any
    free port)", and a seed of port 0 was taken: port 0 means any free port only to a
    listener; nothing can be dialled there."""
    with pytest.raises(AddressError, match=r"port must be 0\.\.65535 \(0: any free port\)"):
        parse_address("host:99999")
    for bad in ("host:99999", "host:0"):
        with pytest.raises(AddressError) as caught:
            parse_address(bad, to_dial=True)
        assert "port must be 1..65535" in str(caught.value) and "free port" not in str(caught.value)
    assert parse_address("host:65535", to_dial=True) == ("host", 65535)
    with pytest.raises(ConfigError, match="seed 1: port must be 1..65535"):
        load_config(None, {}, {"seeds": ["127.0.0.1:0"]})


# --- --check rendering -----------------------------------------------------------------------


def test_format_config_round_trips(tmp_path):
    secret = write(tmp_path, "s3cret", name="secret")
    config = load_config(
        None,
        {"KVD_SEEDS": "a:1,b:2"},
        {"cluster_secret_file": secret, "listen": "0.0.0.0:7379"},
    )
    text = format_config(config)
    assert "# client_tokens_file is not set" in text
    assert 'seeds = ["a:1", "b:2"]  # KVD_SEEDS' in text
    reloaded = load_config(write(tmp_path, text, name="again.toml"), {}, {})
    assert reloaded == config


def test_unknown_env_vars():
    assert unknown_env_vars({"KVD_N": "3", "KVD_REPLICAS": "3", "HOME": "/"}) == ["KVD_REPLICAS"]


# --- the real console script -------------------------------------------------------------------


def run_kvd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kvd.main", *args],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_check_prints_effective_config(tmp_path):
    path = write(tmp_path, 'node_id = "n1"\nn = 5\n')
    proc = run_kvd("--config", path, "--check", "--seeds", "h1:7380,h2:7380",
                   env={"KVD_R": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    effective = tomllib.loads(proc.stdout)
    assert effective["node_id"] == "n1"
    assert (effective["n"], effective["r"], effective["w"]) == (5, 3, 2)
    assert effective["seeds"] == ["h1:7380", "h2:7380"]
    unset = {key for key, field in Config.model_fields.items() if field.default is None}
    assert set(effective) == set(Config.model_fields) - unset


def test_cli_wrong_type_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, 'n = "three"\n')
    proc = run_kvd("--config", path, "--check")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"kvd: error: {path}: n: expected an integer, got 'three'\n"
    assert "Traceback" not in proc.stderr


def test_cli_refuses_non_loopback_without_secret():
    proc = run_kvd("--listen", "0.0.0.0:7000", "--check")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert "listen 0.0.0.0:7000 is not loopback: set cluster_secret_file" in proc.stderr


def test_cli_version():
    proc = run_kvd("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "kvd 0.1.0"


def test_cli_check_never_shows_secret_contents(tmp_path):
    secret = write(tmp_path, "TOP-SECRET-7f3a9c", name="cluster.secret")
    tokens = write(tmp_path, '[tokens]\nops = { token = "TOKEN-b81e22-0123456789", '
                   'role = "admin" }\n', name="tokens")
    for private in (secret, tokens):
        os.chmod(private, 0o600)
    path = write(tmp_path, f'client_tokens_file = "{tokens}"\npeer_listen = "0.0.0.0:7380"\n')
    proc = run_kvd("--config", path, "--check", "--cluster-secret-file", secret)
    assert proc.returncode == 0, proc.stderr
    assert "TOP-SECRET-7f3a9c" not in proc.stdout + proc.stderr
    assert "TOKEN-b81e22" not in proc.stdout + proc.stderr
    effective = tomllib.loads(proc.stdout)
    assert effective["cluster_secret_file"] == secret
    assert effective["client_tokens_file"] == tokens


@pytest.mark.parametrize("secret, mode, says", [
    ("abc", 0o600, "at least 16"),
    ("", 0o600, "at least 16"),
    ("a-long-enough-secret-0123", 0o644, "chmod 600"),
])
def test_cli_check_refuses_the_secret_start_up_refuses(tmp_path, secret, mode, says):
    """--check said 0 for a secret (or tokens) file that start-up then refused with exit 2:
    it now loads them as start-up does, never showing their contents."""
    path = write(tmp_path, secret, name="cluster.secret")
    os.chmod(path, mode)
    proc = run_kvd("--check", "--cluster-secret-file", path)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if secret:
        assert secret not in proc.stderr


def test_cli_check_refuses_a_tokens_file_start_up_refuses(tmp_path):
    tokens = write(tmp_path, "not toml [", name="tokens")
    os.chmod(tokens, 0o600)
    proc = run_kvd("--check", env={"KVD_CLIENT_TOKENS_FILE": tokens})
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "tokens" in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode, says", [
    (0o755, "is accessible by others (mode 0755)"),
    (0o770, "is accessible by its group (mode 0770)"),
])
def test_cli_check_refuses_a_data_dir_start_up_refuses(tmp_path, mode, says):
    """--check said 0 for a data_dir of mode 0755 that start-up then refused with exit 2; it
    now judges the data directory as start-up does, with the same line, and changes
    nothing in it."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    check = run_kvd("--check", "--data-dir", str(data))
    assert check.returncode == 2, check.stdout
    assert check.stdout == "" and len(check.stderr.splitlines()) == 1, check.stderr
    assert f"data_dir {data} {says}" in check.stderr, check.stderr
    start = run_kvd("--data-dir", str(data), "--listen", f"127.0.0.1:{free_port()}",
                    "--peer-listen", f"127.0.0.1:{free_port()}",
                    env={"KVD_METRICS_LISTEN": ""})
    assert (start.returncode, start.stderr) == (check.returncode, check.stderr)
    assert stat.S_IMODE(data.stat().st_mode) == mode and list(data.iterdir()) == []


def test_cli_check_refuses_an_unfinished_restore_and_creates_no_data_dir(tmp_path):
    """The other data-directory refusal at start (exit 1), checked without touching it;
    a data_dir that does not exist yet passes (start-up creates it) and is not created."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "RESTORE-INCOMPLETE").write_text("")
    check = run_kvd("--check", "--data-dir", str(data))
    assert check.returncode == 1 and len(check.stderr.splitlines()) == 1, check.stderr
    assert "unfinished kvd restore" in check.stderr, check.stderr
    assert sorted(p.name for p in data.iterdir()) == ["RESTORE-INCOMPLETE"]
    missing = tmp_path / "not-yet" / "data"
    assert run_kvd("--check", "--data-dir", str(missing)).returncode == 0
    assert not missing.parent.exists()


def test_cli_missing_config_file(tmp_path):
    proc = run_kvd("--config", str(tmp_path / "x.toml"), "--check")
    assert proc.returncode == 2
    assert proc.stderr == f"kvd: error: missing config file {tmp_path / 'x.toml'}\n"
