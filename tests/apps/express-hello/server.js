const express = require("express");

const app = express();
app.get("/", (req, res) => res.send(`hello from express ${require("express/package.json").version}\n`));
app.listen(process.env.PORT, "0.0.0.0");
