#!/usr/bin/python3
"""A client of another ecosystem built from the daemon's live introspection.

Python dbus-fast (Debian package python3-dbus-fast; the same API as dbus-next) parses
introspection XML with xml.etree, which is strict: a `--` inside an XML comment (zbus
writes doc comments as comments) is a parse error there, while busctl and GDBus accept it.

Walks every object path reachable from `/` on the bus name, parses each one's XML
strictly (xml.etree directly, for an exact error position, then dbus_fast's Node.parse),
builds a dbus-fast proxy object from it, binds every org.dindhelper1.* interface, reads
every readable property through the generated getters and calls `ListImages` and
`ListLoops` through the generated methods. Prints one JSON object (paths, interfaces,
bound members) on stdout; exits 1 with the path, line and text on the first bad XML.

Usage: introspect_client.py BUS_ADDRESS BUS_NAME
"""

import asyncio
import json
import sys
import xml.etree.ElementTree as ET

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Node
from dbus_fast.proxy_object import BaseProxyInterface

PREFIX = "org.dindhelper1."


def strict(xml: str, path: str) -> Node:
    try:
        ET.fromstring(xml)
    except ET.ParseError as e:
        line, col = e.position
        lines = xml.splitlines()
        text = lines[line - 1] if 0 < line <= len(lines) else ""
        print(
            f"{path}: live introspection XML is not well-formed: {e}\n"
            f"  line {line}, column {col}: {text.strip()!r}",
            file=sys.stderr,
        )
        sys.exit(1)
    return Node.parse(xml)


async def introspect_xml(bus: MessageBus, name: str, path: str) -> str:
    reply = await bus.call(
        Message(
            destination=name,
            path=path,
            interface="org.freedesktop.DBus.Introspectable",
            member="Introspect",
        )
    )
    if reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"Introspect {path}: {reply.error_name} {reply.body}")
    return reply.body[0]


async def main(address: str, name: str) -> None:
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    report = {"paths": {}, "calls": {}}
    todo = ["/"]
    while todo:
        path = todo.pop()
        node = strict(await introspect_xml(bus, name, path), path)
        for child in node.nodes:
            todo.append(path.rstrip("/") + "/" + child.name)
        ours = [i for i in node.interfaces if i.name.startswith(PREFIX)]
        if not ours:
            continue
        proxy = bus.get_proxy_object(name, path, node)
        entry = {}
        for intr in ours:
            iface = proxy.get_interface(intr.name)
            members = []
            for m in intr.methods:
                fn = "call_" + BaseProxyInterface._to_snake_case(m.name)
                assert callable(getattr(iface, fn)), f"{path} {intr.name}: no {fn}"
                members.append(m.name)
            for s in intr.signals:
                fn = "on_" + BaseProxyInterface._to_snake_case(s.name)
                assert callable(getattr(iface, fn)), f"{path} {intr.name}: no {fn}"
                members.append(s.name)
            for p in intr.properties:
                getter = getattr(iface, "get_" + BaseProxyInterface._to_snake_case(p.name))
                if p.access.readable():
                    await getter()
                members.append(p.name)
            entry[intr.name] = sorted(members)
            if intr.name == PREFIX + "Manager":
                images = await iface.call_list_images()
                loops = await iface.call_list_loops()
                report["calls"]["ListImages"] = len(images)
                report["calls"]["ListLoops"] = len(loops)
        report["paths"][path] = entry
    bus.disconnect()
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
