-------------------------------- MODULE SBus --------------------------------
(***************************************************************************)
(* The S-Bus commit protocol (docs/protocol.md sections 1, 4, 5;           *)
(* service/sbus/core/rules.py `decide`, steps 9a-9g) as a TLA+ state       *)
(* machine.                                                                *)
(*                                                                         *)
(*  - shards: a version per key, a tombstone flag; versions never reused   *)
(*  - the DeliveryLog (DL): per agent a partial map key -> version served, *)
(*    overwritten on every read, set to the new version on commit          *)
(*    (read-your-writes); entries expire by TTL nondeterministically       *)
(*  - commits of 1..MaxWrites keys (multi), deletes (tombstones), creates  *)
(*    of tombstoned keys (continuing at tombstone + 1), and multi commits   *)
(*    mixing commits, creates and deletes in one atomic step               *)
(*  - ORI on/off; mandates (issue, consume once, expire)                   *)
(*  - Variant "atomic": validation and write in one step (this service)    *)
(*    Variant "split":  validate, then write in a later step (reference)   *)
(*  - hist: every committed transaction, in global commit order            *)
(*                                                                         *)
(* One session per agent (session_id is just another agent identity here). *)
(* Explicit read_set entries are not modelled separately: the DL is the    *)
(* read set.  Rejected commits change nothing (protocol.md 4, step 10),    *)
(* so for ordinary agents they are stuttering steps and are not modelled;  *)
(* only the liveness agent `Hero` takes an explicit step when it is        *)
(* rejected.                                                               *)
(***************************************************************************)
EXTENDS Naturals, Integers, Sequences, FiniteSets, TLC

CONSTANTS
    Agents,         \* agent identities (one session each)
    Keys,           \* shard keys, all created at version 0 initially
    MaxVersion,     \* model bound: ordinary commits/creates stop at this version
    MaxWrites,      \* most keys one commit writes (multi-commit); protocol.md: >= 1
    ORI,            \* TRUE: step 9e on (ORI), FALSE: ORI off
    Variant,        \* "atomic" or "split"
    Mandates,       \* mandate ids (jtis)
    MandateKeys,    \* keys whose shard was created with require_mandate
    DeletableKeys,  \* keys that may be deleted (liveness: not the target)
    NoMandate,      \* model value: a commit without a mandate
    NoAgent,        \* model value: holder of an unissued mandate
    Hero,           \* the agent of the liveness property, or a model value
    Target,         \* the key Hero wants to write
    MaxExpiries,    \* liveness only: how many TTL / mandate expiries occur
    MaxCommits,     \* model bound: ordinary commits + creates in the history
    MixedCommits,   \* TRUE: multi commits may also create and delete (MC_Mixed.cfg)
    Mutation        \* "none", or one seeded bug (MC_Mut_*.cfg): see Mutations

\* Mutations: each is a plausible implementation bug, switched on only by its own
\* config, to show that the property it targets can fail (is not vacuous).
\* "none" is exactly the protocol; every other value changes one rule of it.
\*  no_version_guard    9f's compare-and-set loses its version condition: the
\*                      expected_version is not checked and the write lands at
\*                      expected_version + 1 (UPDATE .. SET v = :exp + 1 WHERE key
\*                      = :k, without AND v = :exp)              -> WWSerial
\*  no_consumed_check   9a does not reject a consumed jti        -> MandateConsumeOnce
\*  no_mandate_consume  9g does not record the jti consumed      -> MandateConsumeOnce
\*  create_from_zero    POST /shard on a tombstone restarts at 0 -> ReadSetSoundness
\*  create_exempts_multi a multi commit that creates a key asks no mandate for any
\*                      of its keys (the create's exemption applied to the whole
\*                      request instead of the created key)  -> MandateConsumeOnce
\*  dl_keeps_first_read a GET does not overwrite an existing DL entry (setdefault
\*                      instead of assignment): a re-read after 409 cannot refresh
\*                      the stale entry; safe, but Hero may retry forever
\*                                                    -> HeroEventuallyCommits
Mutations == {"none", "no_version_guard", "no_consumed_check", "no_mandate_consume",
              "create_from_zero", "dl_keeps_first_read", "create_exempts_multi"}
ASSUME Mutation \in Mutations
ASSUME MixedCommits \in BOOLEAN

NoV == -1   \* "no DL entry" / "no expected_version"

VARIABLES
    ver,          \* key -> current version
    del,          \* key -> tombstone?
    dl,           \* agent -> key -> version served, or NoV
    expired,      \* agent -> session is in state "expired" (docs/protocol.md section 1)
    mstate,       \* mandate -> "unissued" | "live" | "consumed" | "expired"
    mholder,      \* mandate -> holder
    pending,      \* split variant: agent -> {} or {validated txn awaiting its write}
    hist,         \* committed transactions, in commit order
    heroRecover,  \* Hero got a 409/410 and must re-read (or reset) before retrying
    toRead,       \* keys Hero still has to re-read
    expiries      \* liveness only: expiries so far

vars == <<ver, del, dl, expired, mstate, mholder, pending, hist,
          heroRecover, toRead, expiries>>

IsLive == Hero \in Agents        \* the liveness model has a Hero
Others == Agents \ {Hero}
Vers == 0..(MaxVersion + 1)
Cap(a) == IF a = Hero THEN MaxVersion + 1 ELSE MaxVersion
WriteSets == {W \in SUBSET Keys : Cardinality(W) >= 1 /\ Cardinality(W) <= MaxWrites}
NoDL == [k \in Keys |-> NoV]

TxnRec == [agent : Agents, kind : {"write", "delete", "create", "mixed"},
           w : SUBSET (Keys \X Vers),   \* (key, new version) written
           rs : SUBSET (Keys \X Vers),  \* effective read set (9c)
           ex : SUBSET (Keys \X Vers),  \* expected_version of written keys; for a
                                        \* created key the tombstone it replaced
           c : SUBSET Keys,             \* the keys it created
           m : Mandates \cup {NoMandate}]

TypeOK ==
    /\ ver \in [Keys -> Vers]
    /\ del \in [Keys -> BOOLEAN]
    /\ dl \in [Agents -> [Keys -> {NoV} \cup Vers]]
    /\ expired \in [Agents -> BOOLEAN]
    /\ mstate \in [Mandates -> {"unissued", "live", "consumed", "expired"}]
    /\ mholder \in [Mandates -> Agents \cup {NoAgent}]
    /\ \A a \in Agents : Cardinality(pending[a]) <= 1
    /\ \A a \in Agents : \A r \in pending[a] :
            r \in [w : WriteSets, kind : {"write", "delete"},
                   rs : SUBSET (Keys \X Vers), ex : SUBSET (Keys \X Vers),
                   m : Mandates \cup {NoMandate}]
    /\ \A i \in 1..Len(hist) : hist[i] \in TxnRec
    /\ heroRecover \in BOOLEAN
    /\ toRead \subseteq Keys
    /\ expiries \in 0..MaxExpiries

Init ==
    /\ ver = [k \in Keys |-> 0]
    /\ del = [k \in Keys |-> FALSE]
    /\ dl = [a \in Agents |-> NoDL]
    /\ expired = [a \in Agents |-> FALSE]
    /\ mstate = [m \in Mandates |-> "unissued"]
    /\ mholder = [m \in Mandates |-> NoAgent]
    /\ pending = [a \in Agents |-> {}]
    /\ hist = << >>
    /\ heroRecover = FALSE
    /\ toRead = {}
    /\ expiries = 0

-----------------------------------------------------------------------------
(* The decision of rules.decide, steps 9a-9f, against the current state.  *)

\* 9c: live DL entries of the committer, written keys excluded
RS(a, W) == {<<k, dl[a][k]>> : k \in {j \in Keys \ W : dl[a][j] # NoV}}
\* the client sends the version it read as expected_version (none if not read)
Ex(a, W) == {<<k, dl[a][k]>> : k \in {j \in W : dl[a][j] # NoV}}

\* C: the written keys a multi commit creates (docs/protocol.md section 3.1); the
\* others are committed or deleted.  A create needs no mandate (as POST /shard), is
\* guarded by the key not being live, and sends no expected_version.
OutcomeM(a, W, C, m) ==
    \* 9a mandates
    IF /\ m = NoMandate /\ (W \ C) \cap MandateKeys # {}
       /\ (Mutation = "create_exempts_multi" => C = {})
    THEN "403 MandateRequired"
    ELSE IF m # NoMandate /\ mstate[m] = "unissued" THEN "404 MandateNotFound"
    ELSE IF m # NoMandate /\ mstate[m] = "expired" THEN "410 MandateExpired"
    ELSE IF m # NoMandate /\ mholder[m] # a THEN "403 MandateHolderMismatch"
    ELSE IF m # NoMandate /\ mstate[m] = "consumed" /\ Mutation # "no_consumed_check"
         THEN "409 MandateConsumed"
    \* 9b session
    ELSE IF expired[a] THEN "410 SessionExpired"
    \* 9c-9e effective read set (a deleted key diverges: its tombstone version)
    ELSE IF ORI /\ \E p \in RS(a, W) : ver[p[1]] # p[2] THEN "409 CrossShardStale"
    \* 9f written keys (which one fails first is the trace module's business)
    ELSE IF \E k \in C : ~del[k] THEN "409 ShardAlreadyExists"
    ELSE IF \E k \in W \ C : del[k] THEN "404 ShardDeleted"
    ELSE IF \E p \in Ex(a, W \ C) : ver[p[1]] # p[2] /\ Mutation # "no_version_guard"
         THEN "409 VersionMismatch"
    ELSE "ok"

Outcome(a, W, m) == OutcomeM(a, W, {}, m)

\* the new version of written key k (ex: expected versions sent by the client)
NewVer(k, ex) ==
    IF Mutation = "no_version_guard" /\ \E p \in ex : p[1] = k
    THEN (CHOOSE p \in ex : p[1] = k)[2] + 1
    ELSE ver[k] + 1

\* POST /shard on a tombstone: continues at tombstone + 1 (no ABA)
CreateVer(k) == IF Mutation = "create_from_zero" THEN 0 ELSE ver[k] + 1

\* the new version of written key k of a multi commit creating C
MixedVer(k, C, ex) == IF k \in C THEN CreateVer(k) ELSE NewVer(k, ex)

\* 9g apply: version + 1 (a created key: CreateVer), tombstone on delete (the keys in
\* D), consume the mandate, history, read-your-writes in the committer's DL
ApplyM(a, W, C, D, kind, m, rs, ex) ==
    /\ ver' = [k \in Keys |-> IF k \in W THEN MixedVer(k, C, ex) ELSE ver[k]]
    /\ del' = [k \in Keys |-> IF k \in W THEN k \in D ELSE del[k]]
    /\ dl' = [dl EXCEPT ![a] = [k \in Keys |-> IF k \in W THEN MixedVer(k, C, ex)
                                                  ELSE dl[a][k]]]
    /\ mstate' = IF m = NoMandate \/ Mutation = "no_mandate_consume" THEN mstate
                 ELSE [mstate EXCEPT ![m] = "consumed"]
    /\ hist' = Append(hist, [agent |-> a, kind |-> kind,
                             w |-> {<<k, MixedVer(k, C, ex)>> : k \in W},
                             rs |-> rs, ex |-> ex \cup {<<k, ver[k]>> : k \in C},
                             c |-> C, m |-> m])

Apply(a, W, kind, m, rs, ex) ==
    ApplyM(a, W, {}, IF kind = "delete" THEN W ELSE {}, kind, m, rs, ex)

KindOK(W, kind) == kind = "delete" => (Cardinality(W) = 1 /\ W \subseteq DeletableKeys)
InBound(a, W) ==
    /\ \A k \in W : ver[k] < Cap(a)
    /\ a # Hero => Len(hist) < MaxCommits

\* This service: validation and write are ONE atomic step.
AtomicCommit(a, W, kind, m) ==
    /\ Variant = "atomic"
    /\ KindOK(W, kind) /\ InBound(a, W)
    /\ Outcome(a, W, m) = "ok"
    /\ Apply(a, W, kind, m, RS(a, W), Ex(a, W))
    /\ UNCHANGED <<expired, mholder, pending, heroRecover, toRead, expiries>>

\* Reference server: validate now (siblings under their own locks) ...
SplitValidate(a, W, kind, m) ==
    /\ Variant = "split"
    /\ pending[a] = {}
    /\ KindOK(W, kind) /\ InBound(a, W)
    /\ Outcome(a, W, m) = "ok"
    /\ pending' = [pending EXCEPT ![a] = {[w |-> W, kind |-> kind, m |-> m,
                                           rs |-> RS(a, W), ex |-> Ex(a, W)]}]
    /\ UNCHANGED <<ver, del, dl, expired, mstate, mholder, hist,
                   heroRecover, toRead, expiries>>

\* ... and write later, re-checking only the written keys under their locks.
SplitWrite(a) ==
    \E r \in pending[a] :
        /\ pending' = [pending EXCEPT ![a] = {}]
        /\ IF /\ \A k \in r.w : ~del[k] /\ ver[k] < Cap(a)
              /\ \A p \in r.ex : ver[p[1]] = p[2]
           THEN Apply(a, r.w, r.kind, r.m, r.rs, r.ex)   \* (validated in bound)
           ELSE UNCHANGED <<ver, del, dl, mstate, hist>>
        /\ UNCHANGED <<expired, mholder, heroRecover, toRead, expiries>>

\* A multi commit of the keys W that creates C and deletes D (docs/protocol.md
\* section 3.1), the rest committed: all or nothing in one atomic step, its
\* created keys out of the read set and guarded by being tombstones.
MixedCommit(a, W, C, D, m) ==
    /\ Variant = "atomic"
    /\ C \cap D = {} /\ C \cup D # {} /\ C \cup D \subseteq W /\ D \subseteq DeletableKeys
    /\ InBound(a, W)
    /\ OutcomeM(a, W, C, m) = "ok"
    /\ ApplyM(a, W, C, D, "mixed", m, RS(a, W), Ex(a, W \ C))
    /\ UNCHANGED <<expired, mholder, pending, heroRecover, toRead, expiries>>

Create(a, k) ==
    /\ del[k] /\ InBound(a, {k})
    /\ ver' = [ver EXCEPT ![k] = CreateVer(k)]
    /\ del' = [del EXCEPT ![k] = FALSE]
    /\ hist' = Append(hist, [agent |-> a, kind |-> "create", w |-> {<<k, CreateVer(k)>>},
                             rs |-> {}, ex |-> {<<k, ver[k]>>}, c |-> {k},
                             m |-> NoMandate])
    /\ UNCHANGED <<dl, expired, mstate, mholder, pending, heroRecover, toRead, expiries>>

-----------------------------------------------------------------------------
(* Reads, sessions, TTL, mandates                                         *)

\* GET: served and recorded (overwrites the entry); a GET on an expired
\* session starts it afresh.  A GET of a tombstone answers 404 ShardDeleted and
\* is recorded all the same, at the tombstone version (docs/protocol.md section 2).
ReadDL(a, k) ==
    IF expired[a] THEN [j \in Keys |-> IF j = k THEN ver[k] ELSE NoV]
    ELSE IF Mutation = "dl_keeps_first_read" /\ dl[a][k] # NoV THEN dl[a]
    ELSE [dl[a] EXCEPT ![k] = ver[k]]

Read(a, k) ==
    /\ dl' = [dl EXCEPT ![a] = ReadDL(a, k)]
    /\ expired' = [expired EXCEPT ![a] = FALSE]
    /\ UNCHANGED <<ver, del, mstate, mholder, pending, hist, heroRecover, toRead, expiries>>

\* POST /session (reset)
Reset(a) ==
    /\ dl' = [dl EXCEPT ![a] = NoDL]
    /\ expired' = [expired EXCEPT ![a] = FALSE]

ResetSession(a) ==
    /\ dl[a] # NoDL \/ expired[a]
    /\ Reset(a)
    /\ UNCHANGED <<ver, del, mstate, mholder, pending, hist, heroRecover, toRead, expiries>>

ExpiryOK == ~IsLive \/ expiries < MaxExpiries
CountExpiry == expiries' = IF IsLive THEN expiries + 1 ELSE expiries

\* TTL: any live entry may pass its TTL; when the last one goes the session
\* is "expired" (commits answer 410) until re-read, reset or marker lapse.
ExpireEntry(a, k) ==
    /\ dl[a][k] # NoV /\ ExpiryOK
    /\ dl' = [dl EXCEPT ![a][k] = NoV]
    /\ expired' = [expired EXCEPT ![a] = (dl'[a] = NoDL)]
    /\ CountExpiry
    /\ UNCHANGED <<ver, del, mstate, mholder, pending, hist, heroRecover, toRead>>

\* the "expired" marker is purged one TTL later: the session becomes empty
MarkerLapse(a) ==
    /\ expired[a]
    /\ expired' = [expired EXCEPT ![a] = FALSE]
    /\ UNCHANGED <<ver, del, dl, mstate, mholder, pending, hist, heroRecover, toRead, expiries>>

IssueMandate(m, a) ==
    /\ mstate[m] = "unissued"
    /\ mstate' = [mstate EXCEPT ![m] = "live"]
    /\ mholder' = [mholder EXCEPT ![m] = a]
    /\ UNCHANGED <<ver, del, dl, expired, pending, hist, heroRecover, toRead, expiries>>

ExpireMandate(m) ==
    /\ mstate[m] = "live" /\ ExpiryOK
    /\ mstate' = [mstate EXCEPT ![m] = "expired"]
    /\ CountExpiry
    /\ UNCHANGED <<ver, del, dl, expired, mholder, pending, hist, heroRecover, toRead>>

-----------------------------------------------------------------------------
(* The liveness agent: commits Target once (atomic variant); after every  *)
(* 409/410 it re-reads the keys of its DL or resets its session.          *)

HeroCommitted == \E i \in 1..Len(hist) : hist[i].agent = Hero

HeroMandates ==
    IF Target \in MandateKeys
    THEN {m \in Mandates : mholder[m] = Hero /\ mstate[m] = "live"}
    ELSE {NoMandate}

HeroCommit ==
    /\ IsLive /\ Variant = "atomic"
    /\ ~HeroCommitted /\ ~heroRecover
    /\ InBound(Hero, {Target})
    /\ \E m \in HeroMandates :
         IF Outcome(Hero, {Target}, m) = "ok"
         THEN /\ Apply(Hero, {Target}, "write", m, RS(Hero, {Target}), Ex(Hero, {Target}))
              /\ UNCHANGED <<expired, mholder, pending, heroRecover, toRead, expiries>>
         ELSE \* a 409 or a 410 (its mandate is live and its own): recover first
              /\ heroRecover' = TRUE
              /\ toRead' = {k \in Keys : dl[Hero][k] # NoV}
              /\ UNCHANGED <<ver, del, dl, expired, mstate, mholder, pending, hist, expiries>>

HeroRead ==
    /\ heroRecover
    /\ \/ \E k \in toRead :
            /\ dl' = [dl EXCEPT ![Hero] = ReadDL(Hero, k)]
            /\ expired' = [expired EXCEPT ![Hero] = FALSE]
            /\ toRead' = toRead \ {k}
            /\ heroRecover' = (toRead' # {})
       \/ /\ Reset(Hero)
          /\ toRead' = {}
          /\ heroRecover' = FALSE
    /\ UNCHANGED <<ver, del, mstate, mholder, pending, hist, expiries>>

-----------------------------------------------------------------------------

Next ==
    \/ \E a \in Agents, k \in Keys : Read(a, k) \/ ExpireEntry(a, k)
    \/ \E a \in Agents : ResetSession(a) \/ MarkerLapse(a)
    \/ \E m \in Mandates, a \in Agents : IssueMandate(m, a)
    \/ \E m \in Mandates : ExpireMandate(m)
    \/ \E a \in Others, W \in WriteSets, kind \in {"write", "delete"},
          m \in Mandates \cup {NoMandate} :
          AtomicCommit(a, W, kind, m) \/ SplitValidate(a, W, kind, m)
    \/ \E a \in Others : SplitWrite(a)
    \/ \E a \in Others, k \in Keys : Create(a, k)
    \/ /\ MixedCommits
       /\ \E a \in Others, W \in WriteSets, m \in Mandates \cup {NoMandate} :
            \E C, D \in SUBSET W : MixedCommit(a, W, C, D, m)
    \/ HeroCommit
    \/ HeroRead

Spec == Init /\ [][Next]_vars

\* Liveness: weak fairness of the Hero's Read (recovery) and Commit only.
LiveSpec == Spec /\ WF_vars(HeroRead) /\ WF_vars(HeroCommit)

-----------------------------------------------------------------------------
(* Invariants                                                             *)

\* every DL version was served, so it is <= the current version (versions
\* only grow: deletes leave tombstones, creates continue after them)
ReadSetSoundness ==
    \A a \in Agents, k \in Keys : dl[a][k] # NoV => dl[a][k] <= ver[k]

Idx == 1..Len(hist)

\* no two committed writes of one key produced one version
WWSerial ==
    \A i, j \in Idx : i # j => hist[i].w \cap hist[j].w = {}

\* for every committed transaction and every (k, v) of its effective read
\* set, no commit of k at v + 1 precedes it in the commit order
ORILegal ==
    \A i \in Idx : \A p \in hist[i].rs :
        ~\E j \in 1..(i - 1) : <<p[1], p[2] + 1>> \in hist[j].w

\* Adya's direct serialization graph over committed transactions
Reads(i) == hist[i].rs \cup hist[i].ex
Dep(i, j) ==
    \/ \E p \in hist[i].w : <<p[1], p[2] + 1>> \in hist[j].w    \* ww
    \/ \E p \in hist[i].w : p \in Reads(j)                      \* wr
    \/ \E p \in Reads(i) : <<p[1], p[2] + 1>> \in hist[j].w     \* rw (anti-dependency)

RECURSIVE Closure(_)
Closure(R) ==
    LET R2 == R \cup {e \in Idx \X Idx : \E b \in Idx : <<e[1], b>> \in R /\ <<b, e[2]>> \in R}
    IN IF R2 = R THEN R ELSE Closure(R2)

NoWriteSkew ==
    LET E == {e \in Idx \X Idx : e[1] # e[2] /\ Dep(e[1], e[2])}
    IN \A i \in Idx : <<i, i>> \notin Closure(E)

\* a mandate is carried by at most one committed transaction, only by its
\* holder, and exactly when it is recorded consumed; every committed write
\* of a require_mandate shard carried one, except a create (as POST /shard)
MandateConsumeOnce ==
    /\ \A m \in Mandates :
         /\ Cardinality({i \in Idx : hist[i].m = m}) <= 1
         /\ (mstate[m] = "consumed") <=> (\E i \in Idx : hist[i].m = m)
    /\ \A i \in Idx : hist[i].m # NoMandate => hist[i].agent = mholder[hist[i].m]
    /\ \A i \in Idx :
         (\E p \in hist[i].w : p[1] \in MandateKeys \ hist[i].c) => hist[i].m # NoMandate

\* Liveness: if its mandate (where one is required) is eventually held for
\* good, Hero eventually commits.  Competing commits and deletes are finite
\* (MaxVersion), expiries too (MaxExpiries).
HeroMandateOK == HeroCommitted \/ HeroMandates # {}
HeroEventuallyCommits == (<>[]HeroMandateOK) => <>HeroCommitted

Symmetry == Permutations(Agents)
=============================================================================
