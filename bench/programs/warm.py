"""The warm-start target: a Debian python that imported a heavy stack.

    python3 -I warm.py [EXTRA_MODULE...]

Imports the standard modules below and each EXTRA_MODULE (large installed
packages the bench found), writes 'R' to fd 1, then echoes each byte of
fd 0 to fd 1 until EOF. Dumped while blocked in that read; a restored copy
reads the restore command's stdin, so a byte waiting there comes straight
back: exec -> answering.
"""
import importlib
import os
import sys

import argparse, asyncio, decimal, email, email.mime.multipart, email.parser  # noqa: E401,F401
import http.client, http.server, json, logging, sqlite3, ssl  # noqa: E401,F401
import urllib.request, xml.etree.ElementTree  # noqa: E401,F401

for name in sys.argv[1:]:
    importlib.import_module(name)
os.write(1, b"R")
while True:
    c = os.read(0, 1)
    if not c:
        break
    os.write(1, c)
