# gunicorn settings for fhirbridge: the project's own (src/fhirbridge/service/gunicorn_conf.py), re-exported so
# `gunicorn -c deploy/gunicorn.conf.py 'fhirbridge.service.app:create_app()'` works from a checkout.
from fhirbridge.service.gunicorn_conf import *  # noqa: F403 - re-exports every gunicorn setting of the project's own config
