"""Config: valid files load; every kind of bad input names its field and its source."""

from __future__ import annotations

import textwrap

import pytest

from lmcache_pd.config import load_config, resolve_instance
from lmcache_pd.errors import ConfigError
from lmcache_pd.transport import parse_options

GOOD = textwrap.dedent("""
    model: {path: /models/tiny}
    prefill:
      - {name: prefill-0, http_port: 8100}
    decode:
      - {name: decode-0, http_port: 8200, control_port: 5700, data_port: 5800}
""")


def write(tmp_path, text: str):
    p = tmp_path / "pd.yaml"
    p.write_text(text)
    return p


def test_good_config_has_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.transport.name == "tcp"
    assert cfg.timeouts.transfer_s == 30.0
    assert cfg.instance("decode-0").control_port == 5700
    assert cfg.role_of("prefill-0") == "prefill"


@pytest.mark.parametrize(("patch", "field"), [
    (("http_port: 8100", "http_port: 8100, colour: red"), "prefill.0.colour"),
    (("http_port: 8100", "http_port: '8100'"), "prefill.0.http_port"),
    (("http_port: 8100", "http_port: 70000"), "prefill.0.http_port"),
    (("model: {path: /models/tiny}", "model: {path: /models/tiny, dtype: 16}"), "model.dtype"),
    (("model: {path: /models/tiny}", "model: {}"), "model.path"),
    ((", control_port: 5700", ""), "decode.0.control_port"),
    (("data_port: 5800", "data_port: 8100"), "decode.0.data_port"),
    (("name: decode-0", "name: prefill-0"), "decode.0.name"),
    (("data_port: 5800", "data_port: 5800, data_advertise: 10.0.0.7"), "decode.0.data_advertise"),
    (("data_port: 5800", "data_port: 5800, data_advertise: '10.0.0.7:99999'"), "decode.0.data_advertise"),
])
def test_bad_field_is_named_with_its_file(tmp_path, patch, field):
    path = write(tmp_path, GOOD.replace(*patch))
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert e.value.field == field
    assert str(path) in str(e.value)
    assert f"`{field}`" in str(e.value)


def test_unknown_section_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="`pools`"):
        load_config(write(tmp_path, GOOD + "pools: {size_mib: 1}\n"), environ={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_timeouts_must_be_positive_and_heartbeat_below_lease(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD + "timeouts: {transfer_s: 0}\n"), environ={})
    assert e.value.field == "timeouts.transfer_s"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD + "timeouts: {heartbeat_s: 40}\n"), environ={})
    assert e.value.field == "timeouts.heartbeat_s"


def test_overrides_env_then_cli(tmp_path):
    path = write(tmp_path, GOOD)
    env = {"LMCACHE_PD__POOL__SIZE_MIB": "512", "LMCACHE_PD__TIMEOUTS__ALLOC_S": "2.5"}
    cfg = load_config(path, overrides=["pool.size_mib=1024", "decode.0.cpus=1"], environ=env)
    assert cfg.pool.size_mib == 1024  # CLI wins over the environment
    assert cfg.timeouts.alloc_s == 2.5
    assert cfg.decode[0].cpus == 1
    assert load_config(None, environ={"LMCACHE_PD_CONFIG": str(path)}).model.path == "/models/tiny"


def test_bad_overrides_are_named(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides=["pool.size_mib=lots"], environ={})
    assert e.value.field == "pool.size_mib"
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(path, overrides=["pool.size_mib"], environ={})
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides=["decode.3.cpus=1"], environ={})
    assert e.value.field == "decode.3"
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"LMCACHE_PD__POOL__SIZE": "1"})
    assert e.value.field == "pool.size"


def test_no_config_at_all():
    with pytest.raises(ConfigError, match="LMCACHE_PD_CONFIG"):
        load_config(None, environ={})


def test_proxy_subsets_must_name_instances(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD + "proxy: {decodes: [decode-9]}\n"), environ={})
    assert e.value.field == "proxy.decodes"


def test_transport_options_are_validated_by_the_transport():
    assert parse_options("tcp", {"streams": 4}).streams == 4
    with pytest.raises(ConfigError) as e:
        parse_options("tcp", {"stream": 4})
    assert e.value.field == "transport.options.stream"
    with pytest.raises(ConfigError) as e:
        parse_options("tcp", {"streams": "four"})
    assert e.value.field == "transport.options.streams"
    with pytest.raises(ConfigError, match="unknown transport 'carrier-pigeon'"):
        parse_options("carrier-pigeon", {})


def test_instance_name_resolution():
    assert resolve_instance("decode-0", environ={}) == "decode-0"
    assert resolve_instance(None, environ={"LMCACHE_PD_INSTANCE": "prefill-0"}) == "prefill-0"
    with pytest.raises(ConfigError, match="LMCACHE_PD_INSTANCE"):
        resolve_instance(None, environ={})


def test_the_cache_server_section_gives_server_tiers_their_socket_and_is_checked(tmp_path):
    text = GOOD + textwrap.dedent("""
        cache:
          enabled: true
          tiers: [{name: server}, {name: disk, options: {path: /tmp/x}}]
        cache_server: {socket: /run/pd/cache.sock, size_mib: 1024, eviction: fifo}
    """)
    cfg = load_config(write(tmp_path, text), environ={})
    assert cfg.cache.tiers[0].options == {"socket": "/run/pd/cache.sock"}
    assert cfg.cache.tiers[1].options == {"path": "/tmp/x"}
    assert cfg.cache_server.eviction == "fifo" and cfg.cache_server.slab_mib == 64
    same = text.replace(", eviction: fifo", ", eviction: fifo, chunk_tokens: 256")  # cache.chunk_tokens' default
    assert load_config(write(tmp_path, same), environ={}).cache_server.chunk_tokens == 256
    mine = text.replace("tiers: [{name: server}", "tiers: [{name: server, options: {socket: /elsewhere}}")
    assert load_config(write(tmp_path, mine), environ={}).cache.tiers[0].options == {"socket": "/elsewhere"}
    for bad, field in [((", eviction: fifo", ", eviction: random"), "cache_server.eviction"),
                       ((", size_mib: 1024", ", size_mib: 32"), "cache_server.size_mib"),
                       ((", eviction: fifo", ", eviction: fifo, chunk_tokens: 128"), "cache.chunk_tokens")]:
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, text.replace(*bad)), environ={})
        assert e.value.field == field


def test_cache_server_puts_the_daemons_tier_first(tmp_path):
    text = GOOD + "cache: {enabled: true, server: /run/pd/cache.sock}\n"
    cfg = load_config(write(tmp_path, text), environ={})
    assert [(t.name, t.options) for t in cfg.cache.tiers] == [("server", {"socket": "/run/pd/cache.sock"})]
    text = GOOD + "cache: {server: /s.sock, tiers: [{name: disk, options: {path: /d}}]}\n"
    assert [t.name for t in load_config(write(tmp_path, text), environ={}).cache.tiers] == ["server", "disk"]
    assert load_config(write(tmp_path, GOOD), environ={}, overrides=["cache.server=/o.sock"]).cache.tiers[0].options \
        == {"socket": "/o.sock"}


def test_launching_a_cache_server_without_its_section_names_it(tmp_path, capsys):
    from lmcache_pd.cli.main import main

    assert main(["launch", "--role", "cache-server", "--config", str(write(tmp_path, GOOD))]) == 2
    assert "field `cache_server`" in capsys.readouterr().err


def test_check_config_prints_the_kv_head_mapping_and_refuses_one_that_cannot_work(tmp_path, capsys):
    import json

    from lmcache_pd.cli.main import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 16, "num_key_value_heads": 8}))
    text = GOOD.replace("/models/tiny", str(model)).replace("http_port: 8100}", "http_port: 8100, tp_size: 2}") \
        .replace("data_port: 5800}", "data_port: 5800, tp_size: 2}")
    assert main(["check-config", "--config", str(write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert "# KV head mapping: 8 KV heads, prefill TP 2 -> decode TP 2" in out
    assert "prefill rank 1 -> decode rank 1: KV heads 4..7" in out
    (model / "config.json").write_text(json.dumps({"num_key_value_heads": 3}))
    assert main(["check-config", "--config", str(write(tmp_path, text))]) == 2
    assert "field `prefill.0.tp_size`" in capsys.readouterr().err


def test_either_side_may_be_wider_and_check_config_prints_where_each_ranks_heads_go(tmp_path, capsys):
    """Between TP sizes either side may be the wider (docs/tensor_parallel.md): check-config
    prints which prefill rank's heads go to which decode rank, one line per (prefill rank, decode
    rank) pair; integrity.verify applies between them too."""
    import json

    from lmcache_pd.cli.main import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_key_value_heads": 8}))
    base = GOOD.replace("/models/tiny", str(model))
    wide_prefill = base.replace("http_port: 8100}", "http_port: 8100, tp_size: 2}")
    assert main(["check-config", "--config", str(write(tmp_path, wide_prefill))]) == 0
    out = capsys.readouterr().out
    assert "prefill TP 2 -> decode TP 1" in out
    assert "prefill rank 1 -> decode rank 0: KV heads 4..7" in out
    wide_decode = base.replace("data_port: 5800}", "data_port: 5800, tp_size: 4}")
    assert main(["check-config", "--config", str(write(tmp_path, wide_decode))]) == 0
    out = capsys.readouterr().out
    assert "prefill TP 1 -> decode TP 4" in out
    assert "prefill rank 0 -> decode rank 3: KV heads 6..7" in out
    assert load_config(write(tmp_path, wide_decode + "integrity: {verify: true}\n"), environ={}).integrity.verify
