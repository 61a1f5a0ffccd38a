"""The DCS is not a root shell: parameters that run commands, load code or name files come from the
member's local config only (pgsidecar/dcs_params.py), and the CLI refuses them before storing."""

from __future__ import annotations

import pytest

from pgsidecar import dcs_params
from pgsidecar.ops import ConfigChangeError, parse_assignments, validate_document


@pytest.mark.parametrize(
    "name",
    [
        "archive_command",
        "restore_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "ssl_passphrase_command",
        "shared_preload_libraries",
        "session_preload_libraries",
        "local_preload_libraries",
        "dynamic_library_path",
        "archive_library",
        "jit_provider",
        "include",
        "include_dir",
        "include_if_exists",
        "external_pid_file",
        "log_directory",
        "ARCHIVE_COMMAND",  # PostgreSQL's names are case-insensitive
    ],
)
def test_local_only_parameters_are_refused_from_the_dcs(name: str) -> None:
    accepted, refused = dcs_params.screen({name: "x", "work_mem": "8MB"})
    assert accepted == {"work_mem": "8MB"}
    assert list(refused) == [name]
    assert "local config" in refused[name]
    assert "parameters_allowed_from_dcs" in refused[name]


def test_a_local_allowlist_opens_one_parameter_by_name_only() -> None:
    params = {"archive_command": "cp %p /a/%f", "restore_command": "cp /a/%f %p"}
    accepted, refused = dcs_params.screen(params, allowed=["Archive_Command"])
    assert accepted == {"archive_command": "cp %p /a/%f"}
    assert list(refused) == ["restore_command"]


def test_the_agents_own_settings_never_come_from_the_dcs_even_when_allowed() -> None:
    accepted, refused = dcs_params.screen(
        {"primary_conninfo": "host=evil", "port": 1}, allowed=["primary_conninfo", "port"]
    )
    assert accepted == {}
    assert set(refused) == {"primary_conninfo", "port"}
    assert all("set by the agent itself" in why for why in refused.values())


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("work_mem\n", "1MB", "not a PostgreSQL parameter name"),
        ("work_mem = '1MB'\ninclude", "x", "not a PostgreSQL parameter name"),
        ("work_mem", "1MB\narchive_command = 'sh'", "newline"),
        ("work_mem", {"deep": [1]}, "scalar"),
        ("work_mem", float("nan"), "not a PostgreSQL value"),
        ("work_mem", float("inf"), "not a PostgreSQL value"),
        ("work_mem", 10**4000, "digits"),
    ],
)
def test_hostile_names_and_values_are_refused_with_a_reason(
    name: str, value: object, words: str
) -> None:
    accepted, refused = dcs_params.screen({name: value})
    assert accepted == {}
    assert words in refused[name]


def test_ordinary_parameters_pass_unchanged() -> None:
    params = {
        "work_mem": "8MB",
        "max_connections": 200,
        "jit": False,
        "auto_explain.log_min_duration": 5.5,
    }
    assert dcs_params.screen(params) == (params, {})


def test_config_set_refuses_a_command_parameter_and_says_how_to_allow_it() -> None:
    with pytest.raises(ConfigChangeError) as e:
        parse_assignments(["postgresql.parameters.archive_command=rm -rf /"])
    msg = str(e.value)
    assert msg.startswith("postgresql.parameters.archive_command: archive_command runs a shell")
    assert "postgresql.parameters_allowed_from_dcs" in msg
    # removing one (a value stored before this check existed) is always possible
    assert parse_assignments(["postgresql.parameters.archive_command=null"])[0][0][-1] == (
        "archive_command"
    )
    # allowed by name: stored (every member's local config must allow it too, to apply it)
    ((path, value),) = parse_assignments(
        ["postgresql.parameters.archive_command=/bin/true"], allowed=["archive_command"]
    )
    assert path == ("postgresql", "parameters", "archive_command") and value == "/bin/true"


def test_config_edit_refuses_a_new_command_parameter_but_keeps_an_old_one() -> None:
    old = {"postgresql": {"parameters": {"archive_command": "/bin/true"}}}
    with pytest.raises(ConfigChangeError, match="shared_preload_libraries loads code"):
        validate_document({"postgresql": {"parameters": {"shared_preload_libraries": "evil"}}}, old)
    # unchanged from what is stored: the edit of another key goes through
    doc, check = validate_document(
        {"postgresql": {"parameters": {"archive_command": "/bin/true", "work_mem": "4MB"}}}, old
    )
    assert doc["postgresql"]["parameters"]["work_mem"] == "4MB" and "archive_command" not in check
    with pytest.raises(ConfigChangeError, match="archive_command runs a shell command"):
        validate_document({"postgresql": {"parameters": {"archive_command": "sh -c x"}}}, old)
