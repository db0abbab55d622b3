def run(quick=False):
    print("resolvent solves: (placeholder)")
