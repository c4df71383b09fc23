# gunicorn settings for fhirbridge: the project's own (src/fhirbridge/gunicorn_conf.py), re-exported so
# `gunicorn -c deploy/gunicorn.conf.py 'fhirbridge.web:create_app()'` works from a checkout.
from fhirbridge.gunicorn_conf import *  # noqa: F401,F403
