from fhirbridge.cli.main import console

console()
