"""service: `fhirbridge serve`, the HTTP service and its scheduler.

`app` (create_app: the Flask app factory mounting every blueprint in one block), `probes` (the same
probes on a port of their own, from a thread in each worker), one blueprint per
module (`api` staff API, `reviewer_api`, `health` probes and JWKS, `notify` FHIR Subscription
notifications, `openapi` the API description, `metrics` the /metrics endpoint, `terminology` our
CodeSystems at /fhir/CodeSystem), `http` (what the
blueprints share: the service of this app, bearer tokens, JSON errors), `scheduler` (Service: the
hospital contexts and the background ticks), `gunicorn_conf`.

Rule: the only layer besides `ui` that imports Flask. May import every layer below it (ui, loop, ehr, ...);
never the CLI or the demo. An endpoint parses the request, calls the loop or the EHR layer, and answers; no
step logic lives here.
"""
