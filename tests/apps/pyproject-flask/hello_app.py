import os
from importlib.metadata import version

import flask

app = flask.Flask(__name__)
GREETING = "hello from pyproject"


@app.get("/")
def index():
    return f"{GREETING} with flask {version('flask')}\n"


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ["PORT"]))
