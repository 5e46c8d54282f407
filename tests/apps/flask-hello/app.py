import os

from flask import Flask

app = Flask(__name__)
VERSION = "v0"


@app.route("/")
def index():
    return f"hello {VERSION}\n"
