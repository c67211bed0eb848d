"""One scenario of a real Redis client library (redis-py), run against a Redis address: plain
commands, pipelines, MULTI/EXEC, WATCH (with a conflict), pub/sub, blocking pops, SELECT and
the client's own name. Prints the results as JSON, so that the same run direct and through the
portal can be compared.

Usage: client.py HOST:PORT [USER PASSWORD]"""

import json
import sys
import threading
import time

import redis

host, port = sys.argv[1].rsplit(":", 1)
auth = {}
if len(sys.argv) > 3:
    auth = {"username": sys.argv[2] or None, "password": sys.argv[3]}


def client(**kw):
    return redis.Redis(host=host, port=int(port), socket_timeout=10, **auth, **kw)


r = client()
other = client()
out = {}
r.flushall()
out["set"] = r.set("k", "v")
out["get"] = r.get("k").decode()
out["incr"] = [r.incr("n") for _ in range(5)]

p = r.pipeline(transaction=False)
for i in range(200):
    p.set(f"p:{i}", i)
    p.get(f"p:{i}")
out["pipeline"] = [x.decode() if isinstance(x, bytes) else x for x in p.execute()]

p = r.pipeline(transaction=True)
p.incr("t")
p.incr("t")
p.get("t")
out["multi"] = [x.decode() if isinstance(x, bytes) else x for x in p.execute()]

with r.pipeline() as p:
    p.watch("w")
    value = int(p.get("w") or 0)
    p.multi()
    p.set("w", value + 1)
    out["watch_ok"] = p.execute()
with r.pipeline() as p:
    p.watch("w")
    other.set("w", 100)
    p.multi()
    p.set("w", 1)
    try:
        p.execute()
        out["watch_conflict"] = "applied"
    except redis.WatchError:
        out["watch_conflict"] = "WatchError"
out["w"] = r.get("w").decode()

ps = r.pubsub()
ps.subscribe("ch", "ch2")
ps.psubscribe("pat*")
confirmations = []
for _ in range(3):
    m = ps.get_message(timeout=5)
    confirmations.append([m["type"], m["channel"].decode(), m["data"]])
out["subscribed"] = confirmations
out["published"] = [other.publish("ch", "hi"), other.publish("pattern", "p")]
got = []
while len(got) < 2:
    m = ps.get_message(timeout=5)
    if m is None:
        break
    got.append([m["type"], m["channel"].decode(), m["data"].decode()])
out["messages"] = got
ps.unsubscribe()
ps.punsubscribe()
left = []
for _ in range(3):
    m = ps.get_message(timeout=5)
    if m:
        left.append([m["type"], m["data"]])
out["unsubscribed"] = sorted(left)
ps.close()
out["after_pubsub"] = r.ping()

out["blpop_timeout"] = r.blpop("q", timeout=1)


def push():
    time.sleep(0.3)
    other.rpush("q", "x")


t = threading.Thread(target=push)
t.start()
out["blpop"] = [x.decode() for x in r.blpop("q", timeout=5)]
t.join()

db2 = client(db=2)
db2.set("in2", "yes")
out["db2"] = [db2.get("in2").decode(), r.get("in2")]
db2.close()

r.client_setname("named")
out["name"] = r.client_getname()
out["mget"] = len(r.mget([f"p:{i}" for i in range(200)]))
out["dbsize"] = r.dbsize()
print(json.dumps(out, sort_keys=True))
