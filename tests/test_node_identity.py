"""A node keeps its name across re-created containers (whose host names change) unless told otherwise."""

from __future__ import annotations

import sqlite_to_databricks_uploader as up


def settings_for(state_dir, **environ):
    return up.load_settings(["--state-dir", str(state_dir)], environ=environ).settings


def write_state(state_dir, node_id: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    up.StateFile(str(state_dir)).save(up.State(app_id="a", source={}, target="t", node_id=node_id))


def test_node_id_from_the_state_file_when_not_set(tmp_path):
    write_state(tmp_path, "container-1a2b3c")
    assert up.keep_node_id(settings_for(tmp_path)).node_id == "container-1a2b3c"


def test_node_id_setting_wins_over_the_state_file(tmp_path):
    write_state(tmp_path, "container-1a2b3c")
    assert up.keep_node_id(settings_for(tmp_path, NODE_ID="edge-7")).node_id == "edge-7"


def test_host_name_without_a_state_file(tmp_path):
    settings = settings_for(tmp_path / "none")
    assert up.keep_node_id(settings).node_id == settings.node_id != ""


def test_damaged_state_file_leaves_the_host_name(tmp_path):
    (tmp_path / up.STATE_FILE_NAME).write_text("{ half")
    settings = settings_for(tmp_path)
    assert up.keep_node_id(settings).node_id == settings.node_id


def test_config_file_named_by_the_environment(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'from-yaml'}\n")
    settings = up.load_settings([], environ={"UPLOADER_CONFIG": str(config)}).settings
    assert settings.state_dir == str(tmp_path / "from-yaml")
    flagged = up.load_settings(["--config", str(config), "--state-dir", "x"], environ={}).settings
    assert flagged.state_dir == "x"
