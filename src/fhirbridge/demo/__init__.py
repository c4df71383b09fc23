"""demo: `fhirbridge demo`, the whole loop on this machine against a local demo EHR (sekmet).

`localehr` starts and stops the local FHIR server (its whole process group) and seeds a patient; `run`
plays the EHR, the service and the reviewer in turn and says where to look.

Rule: above the loop and the service; may import them and every layer below. Only the CLI and the tests
import it; nothing of the service depends on the demo.
"""
