class ReferenceEngine: pass
