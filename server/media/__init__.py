"""Images from requests: fetching (`netguard`: where a fetch may connect) and decoding (`images`), under limits.

Protocol-neutral: a URL or data: URI and the request field it came from go in, a decoded RGB image
or a 400 naming that field comes out.
"""
