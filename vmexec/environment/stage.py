"""Staging artifacts in S3 once per region, so the client's upload does not grow with the
fleet; machines pull with presigned GET URLs.

Owns:

* the staging bucket of an account and region, ``vmexec-staging-<account>-<region>``:
  created when missing, private (public access blocked), with a lifecycle rule that
  expires everything under ``vmexec/`` after 1 day (what a killed client leaves behind
  goes away by itself) and the ``vmexec:fleet`` / ``vmexec:owner`` / ``vmexec:created``
  tags of the fleet that created it. Every call passes ``ExpectedBucketOwner``, so
  nothing is ever uploaded into a bucket of that name that another account owns;
* content-addressed keys: ``vmexec/a/<sha256>/<file name>``. ``HeadObject`` first: an
  artifact already there is not uploaded again (a second fleet, a re-sync after only the
  user's code changed: only that file goes up). An artifact older than
  ``REFRESH_AFTER`` is copied onto itself (server side, no upload) so the lifecycle rule
  cannot expire it under a fleet that still uses it;
* per-fleet references ``vmexec/fleets/<fleet>/<sha256>`` (empty objects): teardown
  (``delete_staging``) removes the fleet's references, then every artifact no other
  fleet references, then the bucket when nothing is left in it;
* install scripts too long for user-data (``stage_script``), fetched by the few lines
  of ``install.bootstrap_script``;
* per-architecture builds of local packages with compiled extensions,
  ``vmexec/builds/<owner>/<sdist sha256>/<arch>.tar`` (``<owner>``: a hash of the
  caller's AWS identity, so owners never share builds): the first machine of an
  architecture uploads its build there through a presigned PUT that lives
  ``BUILD_PUT_SECONDS`` and requires ``If-None-Match: *`` (S3 refuses to replace a
  build), and later machines install it only if its sha256 is the one the client
  learned from the uploader (``install.built_builds``).

boto3 is imported here and in ``vmexec.providers.ec2`` only. Must not import the
providers: the caller passes the session, regions, fleet id and tags.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import hashlib
import logging
import os
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from vmexec.environment.preflight import normalize_arch
from vmexec.environment.spec import Artifact
from vmexec.errors import ConfigError, EnvSyncError

__all__ = [
    "StagedArtifacts",
    "stage_artifacts",
    "stage_script",
    "delete_staging",
    "staged_fleets",
    "bucket_name",
    "PREFIX",
    "EXPIRY_DAYS",
    "BUILD_PUT_SECONDS",
    "owner_id",
]

log = logging.getLogger(__name__)

#: Everything vmexec stages is under this prefix (the lifecycle rule's filter).
PREFIX = "vmexec/"
#: Days after which S3 deletes staged objects by itself.
EXPIRY_DAYS = 1
#: Presigned URLs live this long: machines launched later in a long-lived fleet need the
#: provider to stage again (cheap: nothing is uploaded) for fresh URLs.
DEFAULT_URL_SECONDS = 12 * 3600
#: An artifact older than this is refreshed (server-side copy) before it is reused, so
#: that it outlives the URLs handed out now.
REFRESH_AFTER = datetime.timedelta(hours=12)
# Above this size, uploads go multipart (s3transfer), in parallel parts.
_MULTIPART = TransferConfig(multipart_threshold=64 * 1024 * 1024,
                            multipart_chunksize=32 * 1024 * 1024, max_concurrency=4)
_TAG_FLEET, _TAG_OWNER, _TAG_CREATED = "vmexec:fleet", "vmexec:owner", "vmexec:created"
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


def bucket_name(account: str, region: str) -> str:
    """The staging bucket of ``account`` in ``region`` (≤ 63 characters, DNS-safe)."""
    return f"vmexec-staging-{account}-{region}"


def _artifact_key(artifact: Artifact) -> str:
    return f"{PREFIX}a/{artifact.sha256}/{artifact.name}"


def _ref_prefix(fleet: str) -> str:
    return f"{PREFIX}fleets/{fleet}/"


def _build_key(owner_id: str, sha256: str, arch: str) -> str:
    return f"{PREFIX}builds/{owner_id}/{sha256}/{arch}.tar"


#: Lifetime of a presigned PUT for a shared build: the first machine of an architecture
#: uses it during its install, soon after boot; an hour is plenty, a leaked URL dies soon.
BUILD_PUT_SECONDS = 3600


def owner_id(arn: str) -> str:
    """The builds folder of one AWS identity (a hash: no ARN in object keys)."""
    return hashlib.sha256(arn.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class StagedArtifacts:
    """What one region's staging did.

    Attributes:
        region: the region.
        bucket: the staging bucket.
        artifacts: the artifacts with presigned URLs (sdists: one per architecture,
            with the build URLs).
        uploaded_bytes: bytes uploaded by this call (0 when everything was there).
        uploaded: names of the artifacts uploaded.
        reused: names of the artifacts already staged.
        expires_at: when the URLs stop working.
    """

    region: str
    bucket: str
    artifacts: list[Artifact]
    uploaded_bytes: int = 0
    uploaded: list[str] = dataclasses.field(default_factory=list)
    reused: list[str] = dataclasses.field(default_factory=list)
    expires_at: Optional[datetime.datetime] = None


def _default_tags(fleet: str) -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {_TAG_FLEET: fleet, _TAG_OWNER: f"{user}@{socket.gethostname()}",
            _TAG_CREATED: now}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _translate(exc: Exception, what: str, region: str) -> EnvSyncError:
    """The one place S3 errors become vmexec errors (with the next step)."""
    code = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    hint = {
        "AccessDenied": "the credentials need s3:CreateBucket, PutObject, GetObject, "
                        "DeleteObject, ListBucket, PutLifecycleConfiguration, "
                        "PutBucketTagging and PutPublicAccessBlock on "
                        "arn:aws:s3:::vmexec-staging-*",
        "BucketAlreadyExists": "another AWS account owns this bucket name; nothing was "
                               "uploaded to it. Stage elsewhere (index_url=/find_links= "
                               "with environment=None) and report this",
    }.get(code, "check the credentials and the region")
    return EnvSyncError(f"staging the environment in {region}: {what} failed ({code}: "
                        f"{exc}); {hint}")


class _Region:
    """One region's S3 client, bucket and account (made in the caller's thread)."""

    def __init__(self, session: Any, region: str, account: str,
                 endpoint_url: Optional[str], caller: str = "") -> None:
        self.region = region
        self.account = account
        self.owner_id = owner_id(caller or account)
        self.bucket = bucket_name(account, region)
        self.s3 = session.client("s3", region_name=region, endpoint_url=endpoint_url,
                                 config=Config(signature_version="s3v4",
                                               retries={"mode": "standard"}))
        self.owner = {"ExpectedBucketOwner": account}

    def exists(self) -> bool:
        try:
            self.s3.head_bucket(Bucket=self.bucket, **self.owner)
            return True
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    def ensure_bucket(self, tags: Mapping[str, str]) -> None:
        if self.exists():
            self._ensure_lifecycle()
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 refuses its own name as a constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.s3.create_bucket(**kwargs)
            log.info("created staging bucket %s", self.bucket)
        except ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":  # a concurrent client made it
                raise
        self.s3.put_public_access_block(
            Bucket=self.bucket, PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True,
                "BlockPublicPolicy": True, "RestrictPublicBuckets": True}, **self.owner)
        self.s3.put_bucket_tagging(Bucket=self.bucket, Tagging={"TagSet": [
            {"Key": k, "Value": v} for k, v in tags.items()]}, **self.owner)
        self._put_lifecycle()

    def _put_lifecycle(self) -> None:
        self.s3.put_bucket_lifecycle_configuration(
            Bucket=self.bucket, LifecycleConfiguration={"Rules": [{
                "ID": "vmexec-expire-staging", "Status": "Enabled",
                "Filter": {"Prefix": PREFIX},
                "Expiration": {"Days": EXPIRY_DAYS},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": EXPIRY_DAYS},
            }]}, **self.owner)

    def _ensure_lifecycle(self) -> None:
        # A bucket made by an older vmexec, or whose rule someone removed: the expiry is
        # what cleans up after killed clients, so put it back.
        try:
            rules = self.s3.get_bucket_lifecycle_configuration(
                Bucket=self.bucket, **self.owner).get("Rules", [])
        except ClientError as exc:
            if _code(exc) != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        if not any(r.get("ID") == "vmexec-expire-staging" for r in rules):
            self._put_lifecycle()

    def head(self, key: str) -> Optional[dict[str, Any]]:
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=key, **self.owner)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def upload(self, artifact: Artifact) -> None:
        key = _artifact_key(artifact)
        extra = {"Metadata": {"sha256": artifact.sha256}, **self.owner}
        if artifact.size >= _MULTIPART.multipart_threshold:
            self.s3.upload_file(artifact.path, self.bucket, key, ExtraArgs=extra,
                                Config=_MULTIPART)
        else:
            with open(artifact.path, "rb") as body:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)

    def refresh(self, key: str) -> None:
        # Copying an object onto itself (with new metadata, as S3 requires) resets its
        # age for the lifecycle rule; no byte leaves the client.
        self.s3.copy_object(Bucket=self.bucket, Key=key, MetadataDirective="REPLACE",
                            CopySource={"Bucket": self.bucket, "Key": key},
                            Metadata={"refreshed": "1"}, **self.owner)

    def presign(self, method: str, key: str, seconds: int, **params: Any) -> str:
        return self.s3.generate_presigned_url(method, Params={"Bucket": self.bucket,
                                                              "Key": key, **params},
                                              ExpiresIn=seconds)

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **self.owner):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def delete_keys(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            self.s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in batch], "Quiet": True}, **self.owner)


def _accounts(session: Any, regions: Sequence[str], endpoint_url: Optional[str]
              ) -> dict[str, "_Region"]:
    try:
        sts = session.client("sts", region_name=regions[0], endpoint_url=endpoint_url)
        identity = sts.get_caller_identity()
        account, caller = str(identity["Account"]), str(identity.get("Arn", ""))
    except (ClientError, BotoCoreError) as exc:
        raise _translate(exc, "GetCallerIdentity", regions[0]) from exc
    # Clients are made here, in one thread: boto3 sessions are not thread-safe.
    return {r: _Region(session, r, account, endpoint_url, caller) for r in regions}


def _per_region(regions: dict[str, "_Region"], fn: Callable[["_Region"], Any]
                ) -> dict[str, Any]:
    if len(regions) == 1:
        return {name: fn(region) for name, region in regions.items()}
    with ThreadPoolExecutor(len(regions), thread_name_prefix="vmexec-stage") as pool:
        futures = {name: pool.submit(fn, region) for name, region in regions.items()}
        return {name: future.result() for name, future in futures.items()}


def _check_regions(regions: Iterable[str]) -> list[str]:
    if isinstance(regions, str):
        regions = [regions]
    names = list(dict.fromkeys(regions))
    if not names:
        raise ConfigError("staging needs at least one region")
    return names


def stage_artifacts(session: Any, regions: Iterable[str], fleet: str,
                    artifacts: Union[Sequence[Artifact], Mapping[str, Sequence[Artifact]]],
                    *, archs: Iterable[str] = (),
                    tags: Optional[Mapping[str, str]] = None,
                    endpoint_url: Optional[str] = None,
                    url_seconds: int = DEFAULT_URL_SECONDS) -> dict[str, StagedArtifacts]:
    """Upload what is missing in each region's staging bucket; presign every artifact.

    The bytes uploaded depend on the artifacts and the regions only — never on how many
    machines will fetch them.

    Args:
        session: the client's ``boto3.Session``.
        regions: the fleet's regions (staged in parallel).
        fleet: the fleet id (its references are what ``delete_staging`` removes).
        artifacts: from ``install.build_artifacts`` (or ``{region: artifacts}`` when
            regions differ, as their install scripts do).
        archs: the plan's architectures (sdists get per-arch build URLs).
        tags: tags for a bucket created now (default: ``vmexec:fleet``/``owner``/
            ``created`` for ``fleet``).
        endpoint_url: S3/STS endpoint (a moto server in tests).
        url_seconds: lifetime of the presigned URLs.

    Returns:
        ``{region: StagedArtifacts}``.

    Raises:
        EnvSyncError: an S3 call failed (the message names the permission to add).
    """
    names = _check_regions(regions)
    targets = [normalize_arch(a) for a in archs]
    bucket_tags = dict(tags) if tags is not None else _default_tags(fleet)
    expires_at = datetime.datetime.now(datetime.timezone.utc) + \
        datetime.timedelta(seconds=url_seconds)

    def one(region: _Region) -> StagedArtifacts:
        mine = artifacts[region.region] if isinstance(artifacts, Mapping) else artifacts
        try:
            return _stage_region(region, fleet, mine, targets, bucket_tags,
                                 url_seconds, expires_at)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, "uploading the artifacts", region.region) from exc

    return _per_region(_accounts(session, names, endpoint_url), one)


def _stage_region(region: _Region, fleet: str, artifacts: Sequence[Artifact],
                  archs: list[str], tags: Mapping[str, str], url_seconds: int,
                  expires_at: datetime.datetime) -> StagedArtifacts:
    region.ensure_bucket(tags)
    result = StagedArtifacts(region.region, region.bucket, [], expires_at=expires_at)
    now = datetime.datetime.now(datetime.timezone.utc)
    for artifact in artifacts:
        key = _artifact_key(artifact)
        # The reference first: a concurrent teardown of another fleet that lists
        # references after this point keeps the artifact.
        region.s3.put_object(Bucket=region.bucket, Key=_ref_prefix(fleet) + artifact.sha256,
                             Body=b"", **region.owner)
        head = region.head(key)
        if head is not None and int(head.get("ContentLength", -1)) == artifact.size:
            result.reused.append(artifact.name)
            modified = head.get("LastModified")
            if modified is not None and now - modified > REFRESH_AFTER:
                region.refresh(key)
        else:
            region.upload(artifact)
            result.uploaded.append(artifact.name)
            result.uploaded_bytes += artifact.size
        url = region.presign("get_object", key, url_seconds)
        if artifact.kind == "sdist":
            for arch in archs or [artifact.arch or "x86_64"]:
                build = _build_key(region.owner_id, artifact.sha256, arch)
                result.artifacts.append(dataclasses.replace(artifact, arch=arch).with_url(
                    url, build_url=region.presign("get_object", build, url_seconds),
                    build_put_url=region.presign(
                        "put_object", build, min(url_seconds, BUILD_PUT_SECONDS),
                        IfNoneMatch="*")))
        else:
            result.artifacts.append(artifact.with_url(url))
    log.info("staged %d artifact(s) in %s: %d uploaded (%d bytes), %d already there",
             len(artifacts), region.bucket, len(result.uploaded), result.uploaded_bytes,
             len(result.reused))
    return result


def stage_script(session: Any, scripts: Mapping[str, str], fleet: str, *,
                 tags: Optional[Mapping[str, str]] = None,
                 endpoint_url: Optional[str] = None,
                 url_seconds: int = DEFAULT_URL_SECONDS) -> dict[str, Artifact]:
    """Stage each region's install script (for ``install.bootstrap_script``).

    The script holds presigned URLs, so it is new at every staging: a few kilobytes per
    region, independent of the fleet's size.

    Args:
        session: the client's ``boto3.Session``.
        scripts: ``{region: install script text}``.
        fleet: the fleet id (``delete_staging`` removes the scripts with the rest).
        tags, endpoint_url, url_seconds: as for ``stage_artifacts``.

    Returns:
        ``{region: the staged script}`` (``url`` set).

    Raises:
        EnvSyncError: an S3 call failed.
    """
    with tempfile.TemporaryDirectory(prefix="vmexec-script-") as tmp:
        per_region: dict[str, list[Artifact]] = {}
        for region, text in scripts.items():
            data = text.encode("utf-8")
            name = f"vmexec-install-{hashlib.sha256(data).hexdigest()[:16]}.sh"
            path = os.path.join(tmp, f"{region}-{name}")
            with open(path, "wb") as f:
                f.write(data)
            per_region[region] = [Artifact.from_file(path, "script", name=name)]
        staged = stage_artifacts(session, list(scripts), fleet, per_region, tags=tags,
                                 endpoint_url=endpoint_url, url_seconds=url_seconds)
    return {region: result.artifacts[0] for region, result in staged.items()}


def delete_staging(session: Any, regions: Iterable[str], fleet: str, *,
                   endpoint_url: Optional[str] = None) -> dict[str, int]:
    """Remove a fleet's staging: its references, the artifacts and builds no other
    fleet references, and the bucket when it is left empty.

    Args:
        session: the client's ``boto3.Session``.
        regions: the fleet's regions.
        fleet: the fleet id given to ``stage_artifacts``.
        endpoint_url: S3/STS endpoint (a moto server in tests).

    Returns:
        ``{region: objects deleted}`` (regions without a bucket count 0).

    Raises:
        EnvSyncError: an S3 call failed; the lifecycle rule still expires the objects
            within a day or two.
    """
    names = _check_regions(regions)

    def one(region: _Region) -> int:
        try:
            return _delete_region(region, fleet)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, "deleting the staged artifacts", region.region) from exc

    return _per_region(_accounts(session, names, endpoint_url), one)


def _delete_region(region: _Region, fleet: str) -> int:
    if not region.exists():
        return 0
    mine = region.list_keys(_ref_prefix(fleet))
    region.delete_keys(mine)
    in_use = {key.rsplit("/", 1)[-1] for key in region.list_keys(f"{PREFIX}fleets/")}
    doomed: list[str] = list(mine)
    for sha in {key.rsplit("/", 1)[-1] for key in mine} - in_use:
        doomed += region.list_keys(f"{PREFIX}a/{sha}/")
        doomed += region.list_keys(f"{PREFIX}builds/{region.owner_id}/{sha}/")
    region.delete_keys(doomed[len(mine):])
    if not region.list_keys(""):
        uploads = region.s3.list_multipart_uploads(Bucket=region.bucket, **region.owner)
        for upload in uploads.get("Uploads", []):
            region.s3.abort_multipart_upload(Bucket=region.bucket, Key=upload["Key"],
                                             UploadId=upload["UploadId"], **region.owner)
        try:
            region.s3.delete_bucket(Bucket=region.bucket, **region.owner)
            log.info("deleted the empty staging bucket %s", region.bucket)
        except ClientError as exc:
            # Another fleet staged something between the listing and the delete: the
            # bucket is theirs now.
            if _code(exc) != "BucketNotEmpty":
                raise
    log.info("fleet %s: deleted %d staged object(s) in %s", fleet, len(doomed),
             region.bucket)
    return len(doomed)


def staged_fleets(session: Any, regions: Iterable[str], *,
                  endpoint_url: Optional[str] = None) -> dict[str, set[str]]:
    """Fleet ids that still have staged artifacts, per region (for ``vmexec cleanup``:
    pass the dead ones to ``delete_staging``).

    Raises:
        EnvSyncError: an S3 call failed.
    """
    names = _check_regions(regions)

    def one(region: _Region) -> set[str]:
        try:
            if not region.exists():
                return set()
            return {key[len(PREFIX + "fleets/"):].split("/", 1)[0]
                    for key in region.list_keys(f"{PREFIX}fleets/")}
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, "listing staged fleets", region.region) from exc

    return _per_region(_accounts(session, names, endpoint_url), one)
