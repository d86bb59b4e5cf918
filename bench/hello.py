"""The ceiling: a bare Flask "hello world" served by the same gunicorn settings as the
provider, so a scenario's ratio to it says how much of the machine Darbaza's own work uses."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    return "hello"
