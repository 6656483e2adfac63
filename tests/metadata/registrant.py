"""A process that registers one instance and a segment, then idles until killed.

Run: python registrant.py URL NAMESPACE INSTANCE_ID TTL_S. Prints REGISTERED when both are in
etcd. Used to check that a SIGKILLed instance vanishes from discovery within its TTL.
"""

from __future__ import annotations

import sys
import time

from mooncake_vllm.metadata import InstanceInfo, open_metadata


def main() -> None:
    url, namespace, instance_id, ttl_s = sys.argv[1:5]
    md = open_metadata(url, namespace=namespace, ttl_s=float(ttl_s))
    md.publish_segment(f"seg-{instance_id}", {"name": f"seg-{instance_id}", "regions": []})
    md.register_instance(InstanceInfo(instance_id, "decode", "http://127.0.0.1:1",
                                      "tcp://127.0.0.1:2", "tiny-llama"))
    print("REGISTERED", flush=True)
    time.sleep(120)  # the test kills us long before this


if __name__ == "__main__":
    main()
