"""`mooncake-vllm doctor` with no cluster named: what this installation can move bytes with.

Prints the engine build (transports compiled in), the RDMA devices libibverbs lists, and, when
pyverbs is importable (Debian's python3-pyverbs, matched to the system rdma-core), each device's
ports, link state and GIDs. Says plainly when there is no RDMA device (the engine then uses TCP).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

# Debian's python3-pyverbs installs here; it is built for the system rdma-core, which is what
# libibverbs loads, while PyPI's pyverbs wheels are not.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def engine_build() -> dict[str, Any]:
    try:
        from mooncake_vllm import _engine  # type: ignore[attr-defined]
    except ImportError as error:
        return {"ok": False, "error": f"native engine not importable: {error}"}
    return {
        "ok": True,
        "module": getattr(_engine, "__file__", "?"),
        "transports": list(_engine.TRANSPORTS),
        "ibverbs_devices": list(_engine.rdma_device_names()),
    }


def import_pyverbs() -> tuple[ModuleType | None, str]:
    """pyverbs.device, trying the interpreter's own path first, then Debian's."""
    try:
        return importlib.import_module("pyverbs.device"), "site-packages"
    except ImportError:
        pass
    sys.path.append(DEBIAN_DIST_PACKAGES)
    try:
        return importlib.import_module("pyverbs.device"), DEBIAN_DIST_PACKAGES
    except ImportError as error:
        return None, f"not importable ({error}); install python3-pyverbs"
    finally:
        sys.path.remove(DEBIAN_DIST_PACKAGES)


def _text(device_module: ModuleType, helper: str, value: Any) -> str:
    fn = getattr(device_module, helper, None)
    try:
        return str(fn(value)) if fn else str(value)
    except Exception:  # noqa: BLE001 - a label is optional, the number is still shown
        return str(value)


def describe_devices(device_module: ModuleType) -> list[dict[str, Any]]:
    try:
        devices = device_module.get_device_list()
    except Exception:  # noqa: BLE001 - pyverbs raises when the list is empty or unavailable
        return []
    out = []
    for dev in devices:
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        entry: dict[str, Any] = {"name": name, "ports": []}
        try:
            with device_module.Context(name=name) as ctx:
                attr = ctx.query_device()
                entry["fw_ver"] = str(getattr(attr, "fw_ver", "?"))
                for port in range(1, attr.phys_port_cnt + 1):
                    pattr = ctx.query_port(port)
                    gids = []
                    for index in range(pattr.gid_tbl_len):
                        try:
                            gid = str(ctx.query_gid(port, index))
                        except Exception:  # noqa: BLE001 - unpopulated GID slots raise
                            continue
                        if gid.strip("0:") != "":
                            gids.append({"index": index, "gid": gid})
                    entry["ports"].append(
                        {
                            "port": port,
                            "state": _text(device_module, "port_state_to_str", pattr.state),
                            "link_layer": _text(
                                device_module, "link_layer_to_str", pattr.link_layer
                            ),
                            "lid": pattr.lid,
                            "active_mtu": _text(device_module, "translate_mtu", pattr.active_mtu),
                            "gids": gids,
                        }
                    )
        except Exception as error:  # noqa: BLE001 - report the device we could not open
            entry["error"] = str(error)
        out.append(entry)
    return out


def collect() -> dict[str, Any]:
    report: dict[str, Any] = {"engine": engine_build()}
    device_module, where = import_pyverbs()
    report["pyverbs"] = where
    report["rdma_devices"] = describe_devices(device_module) if device_module else None
    return report


def print_report(report: dict[str, Any]) -> None:
    engine = report["engine"]
    if engine["ok"]:
        print(f"engine: {engine['module']}")
        print(f"  transports compiled in: {', '.join(engine['transports'])}")
        listed = engine["ibverbs_devices"]
        print(f"  libibverbs devices: {', '.join(listed) if listed else 'none'}")
    else:
        print(f"engine: {engine['error']}")
    print(f"pyverbs: {report['pyverbs']}")
    devices = report["rdma_devices"]
    if devices is None:
        print("RDMA devices: unknown (pyverbs unavailable; see the libibverbs line above)")
    elif not devices:
        print("RDMA devices: none found -- protocol='auto' uses TCP, protocol='rdma' will fail")
    for dev in devices or []:
        firmware = f" (firmware {dev['fw_ver']})" if "fw_ver" in dev else ""
        print(f"RDMA device {dev['name']}{firmware}")
        if "error" in dev:
            print(f"  cannot open: {dev['error']}")
        for port in dev["ports"]:
            print(
                f"  port {port['port']}: {port['state']}, {port['link_layer']}, "
                f"lid {port['lid']}, mtu {port['active_mtu']}"
            )
            for gid in port["gids"] or [{"index": "-", "gid": "no GID configured"}]:
                print(f"    gid[{gid['index']}] {gid['gid']}")
