"""`train --smoke` on a base whose config cannot be read says why: an architecture transformers does not
know is not a network problem, and neither is a local directory."""

from __future__ import annotations

from loratool.smoke import _config_hint


def test_an_unknown_architecture_points_to_transformers_not_the_network(tmp_path):
    error = ValueError(
        "The checkpoint you are trying to load has model type `brandnew` but Transformers does not recognize "
        "this architecture."
    )
    hint = _config_hint(error, str(tmp_path))
    assert "does not know this architecture" in hint and "network" not in hint
    assert "trust_remote_code" in hint


def test_a_local_directory_without_a_config_is_named(tmp_path):
    hint = _config_hint(OSError("no config.json"), str(tmp_path))
    assert str(tmp_path) in hint and "network" not in hint


def test_a_hub_id_needs_the_network_or_the_cache():
    assert "network" in _config_hint(OSError("offline"), "someorg/somemodel")
