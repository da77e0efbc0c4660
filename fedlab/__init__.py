"""The lab layer: whole federated runs on one machine, scenarios behind emulated links, reports.

It stands on top of the rest and nothing below imports it: fedcore <-
fedserver, fedclient <- fedlab, and netem (which knows no federated
learning) <- fedlab. `fedserver simulate`, `fedserver report`, `netem run`,
`netem policies` and `netem report` are its commands: the installed
`fedserver` and `netem` scripts are fedlab.cli's, which extends the
server's and netem's own parsers with them, so the server and the shaping
core never import the lab (`python -m fedserver` and `python -m netem` are
those alone; `python -m fedlab` takes the lab's commands).
"""
