"""The local node's choice of pod network (e2e/local-node.sh free-net), run in network
namespaces made for the test: a network that something else on the machine routes or holds
(a leftover flannel bridge cni0 with 10.244.0.1, say) is never taken, and what is in the way is said.
Needs root and iproute2, as the local node itself does."""

import os
import subprocess
from pathlib import Path

import pytest

LOCAL_NODE = Path(__file__).resolve().parents[1] / "local-node.sh"


def free_net(setup, **env):
    """Runs `local-node.sh free-net` in a fresh network namespace after the `ip` commands in
    `setup`; returns the completed process."""
    ns = f"dbportal-netcheck-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for args in setup:
            subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True)
        environment = {k: v for k, v in os.environ.items() if k != "DBPORTAL_NODE_NET"}
        environment.update(env)
        return subprocess.run(["ip", "netns", "exec", ns, "bash", str(LOCAL_NODE), "free-net"],
                              env=environment, capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)


LEFTOVER_CNI0 = [["link", "add", "cni0", "type", "bridge"],
                 ["addr", "add", "10.244.0.1/24", "dev", "cni0"],
                 ["link", "set", "cni0", "up"]]


@pytest.fixture(autouse=True)
def needs_root():
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (as the local node does)")


def test_a_clean_machine_gets_flannels_default():
    r = free_net([])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "10.244"


def test_a_leftover_cni0_is_named_and_a_free_network_taken():
    r = free_net(LEFTOVER_CNI0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "10.245"
    assert "10.244.0.0/16 is in use" in r.stderr and "cni0" in r.stderr, r.stderr
    assert "ip link delete cni0" in r.stderr


def test_a_chosen_network_in_use_is_refused_plainly():
    r = free_net(LEFTOVER_CNI0, DBPORTAL_NODE_NET="10.244")
    assert r.returncode != 0
    assert "cni0" in r.stderr and "DBPORTAL_NODE_NET" in r.stderr, r.stderr
    r = free_net(LEFTOVER_CNI0, DBPORTAL_NODE_NET="10.250")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "10.250"


def test_the_service_range_in_use_stops_the_node():
    r = free_net([["link", "add", "svc0", "type", "bridge"],
                  ["addr", "add", "10.96.0.5/24", "dev", "svc0"],
                  ["link", "set", "svc0", "up"]])
    assert r.returncode != 0
    assert "Service range 10.96.0.0/24 is in use" in r.stderr and "svc0" in r.stderr, r.stderr
