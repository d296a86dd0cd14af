// cacheme: the MongoDB collection of a `mongodb://` storage. Run once, with mongosh, as a
// user allowed to create collections and indexes in the cache database:
//
//     mongosh "mongodb://admin@host:27017/cacheme" sql/mongo.js
//
// The database is the one in the URL (`cacheme` above). For a collection other than the
// default `cacheme_data`, set `collection` before loading the script:
//
//     mongosh "mongodb://admin@host:27017/cacheme" \
//         --eval 'var collection = "cache"; load("sql/mongo.js")'
//
// Safe to run again: an existing collection is kept, and an index that already exists with
// the same specification is left alone.
//
// Documents: {key: "<prefix>:<key>:<version>", value: BinData(0, ...), expire: ISODate | null}

var name = typeof collection === "string" ? collection : "cacheme_data";

if (!db.getCollectionNames().includes(name)) {
  db.createCollection(name);
}

// One document per cache key; reads look keys up by it, upserts rely on its uniqueness.
db.getCollection(name).createIndex({ key: 1 }, { unique: true, name: "key_unique" });

// The TTL monitor (about once a minute) deletes documents whose `expire` has passed; the
// storage never returns them in between. `expire: null` means no expiry, never deleted.
db.getCollection(name).createIndex({ expire: 1 }, { expireAfterSeconds: 0, name: "expire_ttl" });
